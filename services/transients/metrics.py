"""Classification metrics of the transients domain: ROC/PR AUC, the PLAsTiCC weighted log loss, calibration (ECE,
reliability, Brier), and the figures the evaluation logs (confusion matrix, reliability diagram, early curves).

Every function takes integer labels ``y`` (N,) in 0 .. K-1 and probabilities ``proba`` (N, K); classes absent from
``y`` are skipped where a metric needs positives, so a small test split never crashes the evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

# Kaggle PLAsTiCC (2018) class weights of the weighted multi-class log loss: the rare, most wanted classes 15 (TDE),
# 64 (kilonova) and 99 (the unseen "other" class) count double.
PLASTICC_WEIGHTS: dict[int, float] = {6: 1.0, 15: 2.0, 16: 1.0, 42: 1.0, 52: 1.0, 53: 1.0, 62: 1.0, 64: 2.0,
                                      65: 1.0, 67: 1.0, 88: 1.0, 90: 1.0, 92: 1.0, 95: 1.0, 99: 2.0}

_CLIP = 1e-15  # Kaggle's clipping of submitted probabilities
# every score of classification_metrics, and the ones the evaluation's bootstrap intervals are drawn for
SCORES = ("macro_auc", "micro_auc", "macro_pr_auc", "balanced_accuracy", "macro_f1", "accuracy", "log_loss", "ece",
          "brier")
INTERVAL_SCORES = ("macro_auc", "balanced_accuracy", "macro_f1", "log_loss", "ece")


def _plasticc_target(name: str) -> int | None:
    """90, "90" or "class_90" -> 90; None when the name is not a PLAsTiCC target."""
    text = str(name).strip().lower().removeprefix("class_")
    if not text.isdigit():
        return None
    target = int(text)
    return target if target in PLASTICC_WEIGHTS else None


def class_weights(classes: Sequence[str]) -> np.ndarray:
    """PLAsTiCC weights (K,) when every class is a PLAsTiCC target, else flat weights (ones)."""
    targets = [_plasticc_target(c) for c in classes]
    if classes and all(t is not None for t in targets):
        return np.array([PLASTICC_WEIGHTS[t] for t in targets if t is not None], dtype=np.float64)
    return np.ones(len(classes), dtype=np.float64)


def _check(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).reshape(-1)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != y.shape[0]:
        raise ValueError(f"proba of shape {proba.shape} does not match {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= proba.shape[1]):
        raise ValueError(f"labels must be in 0..{proba.shape[1] - 1}, got {y.min()}..{y.max()}")
    return y, proba


def weighted_log_loss(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> float:
    """PLAsTiCC metric: -sum_j w_j mean_{i in j} log p_ij / sum_j w_j over the classes present in ``y``, after
    clipping to [1e-15, 1 - 1e-15] and renormalising each row (as Kaggle scored submissions)."""
    y, proba = _check(y, proba)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (proba.shape[1],):
        raise ValueError(f"weights of shape {weights.shape}, expected ({proba.shape[1]},)")
    if not y.size:
        return math.nan
    p = np.clip(proba, _CLIP, 1.0 - _CLIP)
    p = p / p.sum(axis=1, keepdims=True)
    log_true = np.log(p[np.arange(len(y)), y])  # (N,)
    counts = np.bincount(y, minlength=proba.shape[1])  # (K,)
    sums = np.bincount(y, weights=log_true, minlength=proba.shape[1])  # (K,)
    present = counts > 0
    per_class = sums[present] / counts[present]
    return float(-(weights[present] * per_class).sum() / weights[present].sum())


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins (b/B, (b+1)/B]; confidence 0 falls in the first."""
    return np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability per confidence bin: mean confidence, accuracy (both NaN in empty bins) and count, (B,)."""
    y, proba = _check(y, proba)
    if bins < 1:
        raise ValueError(f"bins={bins} must be >= 1")
    confidence = proba.max(axis=1) if proba.size else np.zeros(0)
    correct = (proba.argmax(axis=1) == y).astype(np.float64) if proba.size else np.zeros(0)
    index = _bin_index(confidence, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf_mean = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return conf_mean, accuracy, count


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum_b (n_b / N) |accuracy_b - confidence_b| over equal-width confidence bins."""
    conf_mean, accuracy, count = reliability(y, proba, bins)
    total = count.sum()
    if not total:
        return math.nan
    filled = count > 0
    return float((count[filled] / total * np.abs(accuracy[filled] - conf_mean[filled])).sum())


def brier(y: np.ndarray, proba: np.ndarray) -> float:
    """Multi-class Brier score: mean over objects of sum_k (p_k - onehot_k)^2."""
    y, proba = _check(y, proba)
    if not y.size:
        return math.nan
    onehot = np.eye(proba.shape[1])[y]  # (N, K)
    return float(((proba - onehot) ** 2).sum(axis=1).mean())


def _check_pred(pred: np.ndarray | None, proba: np.ndarray) -> np.ndarray:
    if pred is None:
        return proba.argmax(axis=1) if proba.size else np.zeros(len(proba), dtype=np.int64)
    pred = np.asarray(pred).astype(np.int64).reshape(-1)
    if pred.shape[0] != proba.shape[0] or (pred.size and (pred.min() < 0 or pred.max() >= proba.shape[1])):
        raise ValueError(f"pred must hold {proba.shape[0]} classes in 0..{proba.shape[1] - 1}")
    return pred


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def classification_metrics(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], bins: int = 15,
                           pred: np.ndarray | None = None, keys: Collection[str] | None = None) -> dict[str, float]:
    """The evaluation's scores of one system on one split (see the module docstring for absent classes).
    ``pred`` (N,): the system's top classes, for balanced accuracy, macro-F1 and accuracy (default: the argmax of
    ``proba``); the ranking, calibration and probability scores use ``proba``. ``keys``: the ranking scores (ROC
    and PR AUCs, the costly ones) not among them are skipped and NaN (the bootstrap asks for a few scores a
    thousand times)."""
    y, proba = _check(y, proba)
    pred = _check_pred(pred, proba)
    n_classes = proba.shape[1]
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names for {n_classes} probability columns")
    n = len(y)
    out: dict[str, float] = {"n": float(n)}
    if not n:
        return {**dict.fromkeys(SCORES, math.nan), **out}

    def wanted(key: str) -> bool:
        return keys is None or key in keys

    onehot = np.eye(n_classes)[y]  # (N, K)
    aucs, pr_aucs = [], []
    for k in range(n_classes):
        positives = int(onehot[:, k].sum())
        if positives and wanted("macro_pr_auc"):
            pr_aucs.append(float(average_precision_score(onehot[:, k], proba[:, k])))
        if 0 < positives < n and wanted("macro_auc"):
            aucs.append(float(roc_auc_score(onehot[:, k], proba[:, k])))
    out["macro_auc"] = _mean_or_nan(aucs)
    flat = onehot.ravel()
    out["micro_auc"] = (float(roc_auc_score(flat, proba.ravel())) if 0 < flat.sum() < flat.size
                        and wanted("micro_auc") else math.nan)
    out["macro_pr_auc"] = _mean_or_nan(pr_aucs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" when a class is absent
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
    out["macro_f1"] = float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0))
    out["accuracy"] = float((pred == y).mean())
    out["log_loss"] = weighted_log_loss(y, proba, class_weights(classes))
    out["ece"] = expected_calibration_error(y, proba, bins)
    out["brier"] = brier(y, proba)
    return out


# ---------------------------------------------------------------- bootstrap intervals over the test objects


def stratified_resamples(y: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, N) indices into ``y``: each row draws, within every class, as many objects as the class has, with
    replacement (a stratified bootstrap: a class of 4 test objects is never left out of a resample, so macro
    scores keep their classes and a resample cannot be undefined where the sample is not)."""
    y = np.asarray(y).astype(np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    out = np.empty((samples, len(y)), dtype=np.int64)
    start = 0
    for k in np.unique(y):
        members = np.flatnonzero(y == k)
        out[:, start:start + len(members)] = rng.choice(members, size=(samples, len(members)))
        start += len(members)
    return out


def bootstrap_scores(y: np.ndarray, systems: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                     classes: Sequence[str], resamples: np.ndarray, bins: int = 15,
                     keys: Sequence[str] = INTERVAL_SCORES,
                     progress: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``keys`` of :func:`classification_metrics` for every system ({name: (proba, top classes or None)}) on each
    row of ``resamples`` (the same rows for every system, so differences between systems are paired) ->
    {name: {key: (samples,)}}."""
    from tqdm import tqdm

    y = np.asarray(y).astype(np.int64).reshape(-1)
    out = {name: {k: np.empty(len(resamples)) for k in keys} for name in systems}
    rows = tqdm(resamples, desc=progress, unit="resample", disable=progress is None, leave=False, mininterval=2.0)
    for i, idx in enumerate(rows):
        for name, (proba, pred) in systems.items():
            found = classification_metrics(y[idx], proba[idx], classes, bins=bins,
                                           pred=None if pred is None else pred[idx], keys=keys)
            for k in keys:
                out[name][k][i] = found[k]
    return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The central ``level`` percentile interval of bootstrap values (NaNs ignored); None when none is finite."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------- figures (Figure objects, no pyplot state: Agg)


def confusion_figure(y: np.ndarray, proba: np.ndarray, classes: Sequence[str],
                     pred: np.ndarray | None = None) -> Figure:
    """Row-normalised confusion matrix (true class per row) of the top classes ``pred`` (default: the argmax),
    each cell annotated with its fraction and count."""
    y, proba = _check(y, proba)
    n_classes = proba.shape[1]
    counts = confusion_matrix(y, _check_pred(pred, proba), labels=list(range(n_classes)))  # (K, K)
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    size = 1.2 + 0.75 * n_classes
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n_classes):
        for j in range(n_classes):
            color = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{frac[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n_classes), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(n_classes), [f"{c} ({int(r)})" for c, r in zip(classes, rows[:, 0], strict=True)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (objects)")
    ax.set_title(f"confusion matrix, row-normalised (N={len(y)})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def reliability_figure(y: np.ndarray, proba: np.ndarray, bins: int = 15, title: str = "reliability") -> Figure:
    """Reliability diagram (accuracy vs confidence per bin, the diagonal is perfect calibration) over a histogram
    of the top-label confidence; the ECE is in the title."""
    conf_mean, accuracy, count = reliability(y, proba, bins)
    ece = expected_calibration_error(y, proba, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / bins
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    filled = count > 0
    top.bar(centers[filled], accuracy[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    top.bar(centers[filled], conf_mean[filled] - accuracy[filled], bottom=accuracy[filled], width=width,
            fill=False, hatch="//", edgecolor="tab:red", label="gap to confidence")
    top.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title} (ECE = {ece:.3f})")
    bottom.bar(centers, count, width=width, color="0.5", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("objects")
    fig.tight_layout()
    return fig


def _cut_order(key: str) -> tuple[int, float]:
    """Numeric cuts ascending, then the rest ("all") in their given order."""
    try:
        return 0, float(key)
    except ValueError:
        return 1, math.inf


def early_figure(curves: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "macro_auc") -> Figure:
    """``metric`` against the number of detections seen, one line per system: {"model": {"3": metrics, ...,
    "all": metrics}, "baseline": {...}}."""
    cuts = sorted({str(k) for system in curves.values() for k in system}, key=_cut_order)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, system in curves.items():
        by_cut = {str(k): v for k, v in system.items()}
        values = [float(by_cut[c].get(metric, math.nan)) if c in by_cut else math.nan for c in cuts]
        ax.plot(range(len(cuts)), values, marker="o", label=name)
    ax.set_xticks(range(len(cuts)), cuts)
    ax.set_xlabel("detections seen")
    ax.set_ylabel(metric)
    ax.set_title(f"early classification: {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
