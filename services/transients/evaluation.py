"""The transients evaluation: the production model beside a light-curve-feature baseline trained in the same run.

Without ``--data`` the model is scored on its own test split (the training data's test objects); with ``--data``
on every labelled object of that file, an external test set. The baseline (``light-curve`` features into
LightGBM with balanced class weights) is trained on the model's own training objects, also on their cuts to the
first k detections (as the model's truncation augmentation trains it), so the two are compared on the same
footing. Both are scored on whole light curves and cut to their first 3, 5 and 10 detections.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from torch import nn

from shared.registry import EvaluationResult

from .config import TransientsConfig, TransientsEvalConfig
from .curves import Curve
from .data import TransientsState, load_labelled, synthetic_curves
from .metrics import (
    INTERVAL_SCORES,
    SCORES,
    bootstrap_scores,
    classification_metrics,
    confusion_figure,
    early_figure,
    percentile_interval,
    reliability_figure,
    stratified_resamples,
)

METRICS = SCORES  # every score, in the JSON of each system and cut
INTERVAL_METRICS = INTERVAL_SCORES  # the targets and more, with 95 % intervals


def training_curves(cfg: TransientsConfig, state: TransientsState) -> tuple[list[Curve], np.ndarray]:
    """Every labelled light curve the model was trained from (its data file, or the same synthetic set)."""
    if cfg.data:
        labelled = load_labelled(cfg.data, cfg.metadata, cfg, classes=state.classes)
        return labelled.curves, labelled.labels
    curves, labels, _ = synthetic_curves(cfg.synthetic_objects, seed=cfg.seed)
    return curves, labels


def subset(curves: list[Curve], labels: np.ndarray, ids: tuple[str, ...]) -> tuple[list[Curve], np.ndarray]:
    wanted = set(ids)
    keep = [i for i, c in enumerate(curves) if c.object_id in wanted]
    return [curves[i] for i in keep], labels[keep]


def model_outputs(model: nn.Module, cfg: TransientsConfig, state: TransientsState,
                  curves: list[Curve]) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities (N, K) and the model's top classes (N,) (its decision rule, as served)."""
    from shared.tracking import LoadedModel

    from .inference import classify

    found = classify(LoadedModel(model, cfg, state, "transients"), curves)
    return found.probabilities, found.decision


def scores(y: np.ndarray, proba: np.ndarray, classes: list[str], bins: int,
           pred: np.ndarray | None = None) -> dict[str, float | None]:
    """The metrics, rounded; None where one cannot be computed (a ROC-AUC with one class present), so the last
    line stays strict JSON."""
    found = classification_metrics(y, proba, classes, bins=bins, pred=pred)
    return {k: round(float(found[k]), 5) if np.isfinite(found[k]) else None for k in METRICS}


def _rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(interval[0], 5), round(interval[1], 5)]


def add_intervals(metrics: dict[str, Any], y: np.ndarray, systems: dict[str, dict[str, np.ndarray]],
                  picked: dict[str, dict[str, np.ndarray | None]], classes: list[str],
                  settings: TransientsEvalConfig) -> None:
    """95 % intervals from a stratified bootstrap over the test objects: ``ci95`` {metric: [low, high]} beside each
    system's scores (whole curves and every cut) and, with a baseline, ``model_minus_baseline`` {cut: {metric:
    {"value", "ci95"}}}: the paired differences (the same resamples for both), so an interval above 0 means the
    model is ahead on these objects beyond what their sampling explains."""
    resamples = stratified_resamples(y, settings.bootstrap, seed=settings.seed)
    differences: dict[str, dict[str, Any]] = {}
    for cut in systems["model"]:
        drawn = bootstrap_scores(y, {name: (by_cut[cut], picked[name][cut]) for name, by_cut in systems.items()},
                                 classes, resamples, bins=settings.ece_bins, keys=INTERVAL_METRICS,
                                 progress=f"bootstrap, {cut if cut == 'all' else cut + ' detections'}")
        point = {name: metrics[name] if cut == "all" else metrics[name]["early"][cut] for name in drawn}
        for name, values in drawn.items():
            point[name]["ci95"] = {k: _rounded(percentile_interval(v)) for k, v in values.items()}
        if "baseline" in drawn:
            ours, theirs = point["model"], point["baseline"]
            differences[cut] = {
                k: {"value": None if ours[k] is None or theirs[k] is None else round(ours[k] - theirs[k], 5),
                    "ci95": _rounded(percentile_interval(drawn["model"][k] - drawn["baseline"][k]))}
                for k in INTERVAL_METRICS}
    if differences:
        metrics["model_minus_baseline"] = differences
    metrics["bootstrap"] = {"resamples": settings.bootstrap, "stratified_by": "class", "level": 0.95}


def evaluate_classifier(model: nn.Module, cfg: TransientsConfig, state: TransientsState, data: str | None,
                        settings: TransientsEvalConfig) -> EvaluationResult:
    classes = list(state.classes)
    pool, pool_labels = training_curves(cfg, state)
    train, train_y = subset(pool, pool_labels, state.objects["train"])
    if data:
        labelled = load_labelled(data, settings.metadata, cfg, classes=state.classes)
        for line in labelled.report.lines():
            print(f"transients evaluation data: {line}", flush=True)
        test, test_y, split = labelled.curves, labelled.labels, "external"
    else:
        test, test_y = subset(pool, pool_labels, state.objects["test"])
        split = "test"
    if not test:
        raise ValueError("no labelled test object to score")
    cuts: dict[str, list[Curve]] = {"all": test, **{str(k): [c.first_detections(k) for c in test]
                                                    for k in settings.early}}
    started = time.perf_counter()
    outputs = {cut: model_outputs(model, cfg, state, curves) for cut, curves in cuts.items()}
    model_seconds = time.perf_counter() - started
    proba = {cut: p for cut, (p, _) in outputs.items()}
    picked: dict[str, dict[str, np.ndarray | None]] = {"model": {cut: d for cut, (_, d) in outputs.items()}}
    systems: dict[str, dict[str, np.ndarray]] = {"model": proba}
    if settings.baseline:
        from .baseline import FeatureBaseline

        print(f"training the feature baseline on {len(train)} objects", flush=True)
        baseline = FeatureBaseline(len(classes), len(state.bands), seed=settings.seed,
                                   train_cuts=tuple(settings.early)).fit(train, train_y)
        systems["baseline"] = {cut: baseline.predict_proba(curves) for cut, curves in cuts.items()}
        picked["baseline"] = dict.fromkeys(cuts)  # the argmax: trained with balanced weights, the balanced rule
    metrics: dict[str, Any] = {}
    for name, by_cut in systems.items():
        found = {cut: scores(test_y, p, classes, settings.ece_bins, picked[name][cut]) for cut, p in by_cut.items()}
        metrics[name] = {**found["all"], "early": {str(k): found[str(k)] for k in settings.early}}
    if settings.bootstrap:
        add_intervals(metrics, test_y, systems, picked, classes, settings)
    metrics.update({"classes": classes, "n_objects": len(test), "split": split,
                    "class_counts": {c: int((test_y == i).sum()) for i, c in enumerate(classes)},
                    "model_ms_per_object": round(1000 * model_seconds / max(1, sum(len(c) for c in cuts.values())), 4)})
    if settings.baseline:
        metrics["baseline"]["name"] = "light-curve features + LightGBM"
    metrics["model"]["decision"] = cfg.decision
    figures = {"confusion.png": confusion_figure(test_y, proba["all"], classes, picked["model"]["all"]),
               "reliability.png": reliability_figure(test_y, proba["all"], bins=settings.ece_bins,
                                                     title=f"{cfg.model}, {split} ({len(test)} objects)")}
    def auc(name: str, cut: str) -> float:
        value = metrics[name]["macro_auc"] if cut == "all" else metrics[name]["early"][cut]["macro_auc"]
        return math.nan if value is None else float(value)

    curves_by_system = {name: {cut: {"macro_auc": auc(name, cut)} for cut in cuts} for name in systems}
    figures["early_classification.png"] = early_figure(curves_by_system, metric="macro_auc")
    return EvaluationResult(metrics=metrics, figures=figures)
