"""Transients metrics against scikit-learn and hand computations; absent classes; the figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from services.transients.metrics import (
    PLASTICC_WEIGHTS,
    bootstrap_scores,
    brier,
    class_weights,
    classification_metrics,
    confusion_figure,
    early_figure,
    expected_calibration_error,
    percentile_interval,
    reliability,
    reliability_figure,
    stratified_resamples,
    weighted_log_loss,
)

KEYS = {"macro_auc", "micro_auc", "macro_pr_auc", "balanced_accuracy", "macro_f1", "accuracy", "log_loss", "ece",
        "brier", "n"}


@pytest.fixture
def sample() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [30, 12, 7, 11])  # imbalanced, every class present
    logits = rng.normal(size=(len(y), 4))
    logits[np.arange(len(y)), y] += 1.2  # informative but imperfect
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def test_matches_sklearn(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = sample
    m = classification_metrics(y, proba, ["a", "b", "c", "d"])
    assert set(m) == KEYS
    pred = proba.argmax(axis=1)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert m["micro_auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="micro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["n"] == len(y)
    # flat weights: each class counts the same, i.e. sample weights 1 / N_class
    balancing = 1.0 / np.bincount(y)[y]
    assert m["log_loss"] == pytest.approx(log_loss(y, proba, sample_weight=balancing))
    assert m["brier"] == pytest.approx(((proba - np.eye(4)[y]) ** 2).sum(axis=1).mean())


def test_given_top_classes_score_the_decisions_and_leave_the_probability_scores(
        sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = sample
    pred = np.roll(proba.argmax(axis=1), 3)  # any decisions, not the argmax
    m = classification_metrics(y, proba, ["a", "b", "c", "d"], pred=pred)
    plain = classification_metrics(y, proba, ["a", "b", "c", "d"])
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] != pytest.approx(plain["balanced_accuracy"])
    assert all(m[k] == plain[k] for k in ("macro_auc", "micro_auc", "log_loss", "ece", "brier"))
    with pytest.raises(ValueError, match="pred must hold"):
        classification_metrics(y, proba, ["a", "b", "c", "d"], pred=pred[:-1])
    with pytest.raises(ValueError, match="pred must hold"):
        classification_metrics(y, proba, ["a", "b", "c", "d"], pred=pred + 4)


def test_plasticc_weights() -> None:
    assert len(PLASTICC_WEIGHTS) == 15
    assert {c for c, w in PLASTICC_WEIGHTS.items() if w == 2.0} == {15, 64, 99}
    np.testing.assert_array_equal(class_weights(["class_15", "90", "99", "64", "6"]), [2, 1, 2, 2, 1])
    np.testing.assert_array_equal(class_weights(["SN Ia", "SN II", "90"]), [1, 1, 1])
    np.testing.assert_array_equal(class_weights(["90", "7"]), [1, 1])  # 7 is no PLAsTiCC target


def test_weighted_log_loss_by_hand() -> None:
    y = np.array([0, 0, 1, 2])
    proba = np.array([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1], [0.2, 0.4, 0.4], [0.1, 0.1, 0.8]])
    weights = class_weights(["class_15", "class_42", "class_64"])  # 2, 1, 2
    per_class = [-(math.log(0.5) + math.log(0.8)) / 2, -math.log(0.4), -math.log(0.8)]
    expected = (2 * per_class[0] + 1 * per_class[1] + 2 * per_class[2]) / 5
    assert weighted_log_loss(y, proba, weights) == pytest.approx(expected)
    # rows are renormalised, and zeros clipped (finite loss)
    assert weighted_log_loss(y, proba * 0.5, weights) == pytest.approx(expected)
    assert math.isfinite(weighted_log_loss(np.array([0]), np.array([[0.0, 1.0, 0.0]]), weights))
    # a class absent from y is left out of the normalisation too
    assert weighted_log_loss(y[:3], proba[:3], weights) == pytest.approx((2 * per_class[0] + per_class[1]) / 3)


def test_ece_and_reliability_by_hand() -> None:
    y = np.array([0, 1, 1, 0])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    # 2 bins: (0, .5], (.5, 1]; every top-label confidence is > .5 -> one bin, confidence .75, accuracy .5
    conf, acc, count = reliability(y, proba, bins=2)
    np.testing.assert_array_equal(count, [0, 4])
    assert math.isnan(conf[0]) and math.isnan(acc[0])
    assert conf[1] == pytest.approx(0.75) and acc[1] == pytest.approx(0.5)
    assert expected_calibration_error(y, proba, bins=2) == pytest.approx(0.25)
    # 10 bins: .9 (right), .8 (wrong), .6 (right), .7 (wrong) -> each alone: (0.1 + 0.8 + 0.4 + 0.7) / 4
    assert expected_calibration_error(y, proba, bins=10) == pytest.approx(0.5)


def test_brier_by_hand() -> None:
    y = np.array([0, 2])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    expected = ((0.3**2 + 0.2**2 + 0.1**2) + (0.2**2 + 0.2**2 + 0.4**2)) / 2
    assert brier(y, proba) == pytest.approx(expected)


def test_absent_classes(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = sample
    keep = y != 2  # class 2 never occurs
    m = classification_metrics(y[keep], proba[keep], ["a", "b", "c", "d"])
    present = [0, 1, 3]
    onehot = np.eye(4)[y[keep]]
    expected_auc = np.mean([roc_auc_score(onehot[:, k], proba[keep][:, k]) for k in present])
    assert m["macro_auc"] == pytest.approx(expected_auc)
    assert all(math.isfinite(v) for v in m.values())
    # a single class: no AUC qualifies, the rest still works
    one = classification_metrics(np.zeros(5, dtype=int), proba[:5], ["a", "b", "c", "d"])
    assert math.isnan(one["macro_auc"])
    assert math.isfinite(one["micro_auc"]) and math.isfinite(one["log_loss"]) and math.isfinite(one["macro_pr_auc"])
    empty = classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 4)), ["a", "b", "c", "d"])
    assert set(empty) == KEYS and empty["n"] == 0 and math.isnan(empty["macro_auc"])


def test_figures(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = sample
    classes = ["SN Ia", "SN II", "SN Ibc", "SLSN"]
    assert isinstance(confusion_figure(y, proba, classes), Figure)
    assert isinstance(reliability_figure(y, proba, bins=10, title="model"), Figure)
    m = classification_metrics(y, proba, classes)
    curves = {"model": {"3": m, "10": m, "5": m, "all": m}, "baseline": {"3": m, "all": m}}
    fig = early_figure(curves, metric="macro_auc")
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["3", "5", "10", "all"]


def test_stratified_resamples_keep_every_class_count_and_draw_within_the_class() -> None:
    y = np.array([2, 0, 0, 1, 0, 2, 0, 0, 0, 1, 0, 4])  # shuffled, one class of one object, class 3 absent
    rows = stratified_resamples(y, samples=200, seed=3)
    assert rows.shape == (200, len(y))
    for row in rows:
        assert np.array_equal(np.bincount(y[row], minlength=5), np.bincount(y, minlength=5))
    assert len(np.unique(rows[:, 0])) > 1  # rows differ: an actual resampling, not the sample itself
    assert np.array_equal(stratified_resamples(y, 200, seed=3), rows)  # reproducible from the seed


def test_bootstrap_intervals_hold_the_sample_and_pair_the_systems(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = sample
    rng = np.random.default_rng(1)
    noise = rng.dirichlet(np.ones(4), size=len(y))  # an uninformative system
    rows = stratified_resamples(y, samples=300, seed=0)
    drawn = bootstrap_scores(y, {"good": (proba, None), "noise": (noise, None), "same": (proba, None)},
                             ["a", "b", "c", "d"], rows)
    point = classification_metrics(y, proba, ["a", "b", "c", "d"])
    for key in ("macro_auc", "balanced_accuracy", "macro_f1", "log_loss", "ece"):
        low, high = percentile_interval(drawn["good"][key])
        assert low < high
        if key != "ece":  # a resample's ECE is biased upwards (fewer distinct objects per bin), the rest hold it
            assert low <= point[key] <= high
    # paired: a system against itself differs by exactly 0 on every resample; the informative one beats noise
    assert percentile_interval(drawn["good"]["macro_auc"] - drawn["same"]["macro_auc"]) == (0.0, 0.0)
    assert percentile_interval(drawn["good"]["macro_auc"] - drawn["noise"]["macro_auc"])[0] > 0.1
    # the given top classes are what balanced accuracy scores
    picked = bootstrap_scores(y, {"all_a": (proba, np.zeros(len(y), dtype=np.int64))}, ["a", "b", "c", "d"], rows,
                              keys=("balanced_accuracy",))
    assert np.allclose(picked["all_a"]["balanced_accuracy"], 0.25)
    assert percentile_interval(np.array([np.nan, np.nan])) is None


def test_only_the_asked_scores_are_computed(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = sample
    every = classification_metrics(y, proba, ["a", "b", "c", "d"])
    some = classification_metrics(y, proba, ["a", "b", "c", "d"], keys=("macro_auc", "ece"))
    assert some["macro_auc"] == every["macro_auc"] and some["ece"] == every["ece"]
    assert math.isnan(some["micro_auc"]) and math.isnan(some["macro_pr_auc"])
