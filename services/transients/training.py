"""Loss, additive validation statistics and the post-training calibration of the transients classifiers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import labels_of, to_device

OOD_QUANTILE = 0.95  # the OOD threshold: this quantile of the validation objects' scores


def class_loss(model: nn.Module, batch: Any, device: torch.device) -> Tensor:
    """Cross-entropy with the model's class weights (balanced: inverse training frequency; sqrt: its root) and
    label smoothing; for an ensemble, of every member's logits."""
    batch = to_device(batch, device)
    weights = getattr(model, "class_weights", None)
    smoothing = float(getattr(model, "label_smoothing", 0.0))
    labels = labels_of(batch)
    member_logits = getattr(model, "member_logits", None)
    if callable(member_logits):  # an ensemble: the mean of the members' own losses (each trained on its own)
        logits = member_logits(batch)  # (M, B, K)
        m = logits.shape[0]
        return F.cross_entropy(logits.flatten(0, 1), labels.repeat(m), weight=weights, label_smoothing=smoothing)
    logits = model(batch)  # (B, K)
    return F.cross_entropy(logits, labels, weight=weights, label_smoothing=smoothing)


@torch.no_grad()
def logits_and_labels(model: nn.Module, batches: Iterable[Any], device: torch.device) -> tuple[Tensor, Tensor]:
    """Temperature-scaled logits (N, K) and labels (N,) on the CPU."""
    out, labels = [], []
    for batch in batches:
        batch = to_device(batch, device)
        out.append(model(batch).float().cpu())
        labels.append(labels_of(batch).cpu())
    if not out:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(out), torch.cat(labels)


def decide(model: nn.Module, logits: Tensor) -> Tensor:
    """The top class the model picks for each row of ``logits`` (its decision rule; argmax without one)."""
    rule = getattr(model, "decide", None)
    return rule(logits) if callable(rule) else logits.argmax(-1)


def metric_sums(model: nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
    """Per class: objects, summed negative log-likelihood, correct top classes (the model's decision rule; added
    over workers)."""
    logits, labels = logits_and_labels(model, batches, device)
    sums: dict[str, float] = {}
    if not len(labels):
        return sums
    nll = F.cross_entropy(logits, labels, reduction="none")
    correct = (decide(model, logits) == labels).float()
    for k in range(logits.shape[1]):
        members = labels == k
        sums[f"n_{k}"] = float(members.sum())
        sums[f"nll_{k}"] = float(nll[members].sum())
        sums[f"correct_{k}"] = float(correct[members].sum())
    return sums


def metrics_from(sums: Mapping[str, float]) -> dict[str, float]:
    """``log_loss``: the mean over classes of each class's mean NLL (PLAsTiCC's metric with equal weights);
    accuracy and balanced accuracy."""
    classes = sorted(int(k[2:]) for k in sums if k.startswith("n_"))
    present = [k for k in classes if sums[f"n_{k}"] > 0]
    if not present:
        return {"log_loss": math.nan, "accuracy": math.nan, "balanced_accuracy": math.nan}
    total = sum(sums[f"n_{k}"] for k in present)
    return {
        "log_loss": float(np.mean([sums[f"nll_{k}"] / sums[f"n_{k}"] for k in present])),
        "accuracy": sum(sums[f"correct_{k}"] for k in present) / total,
        "balanced_accuracy": float(np.mean([sums[f"correct_{k}"] / sums[f"n_{k}"] for k in present])),
    }


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The softmax temperature that minimises the validation NLL (Guo et al. 2017), searched on log T."""
    if not len(labels):
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.01 < t < 100 else 1.0


def ood_scores(logits: Tensor) -> Tensor:
    """The energy score of each object (Liu et al. 2020): -logsumexp of the calibrated logits; higher means less
    like any known class."""
    return -torch.logsumexp(logits, dim=-1)


def calibrate(model: nn.Module, val_batches: Any, device: torch.device) -> tuple[float, float | None, dict[str, float]]:
    """Temperature and OOD threshold fitted on validation (the model's temperature is set to it)."""
    temperature_buffer: Tensor = model.temperature  # type: ignore[assignment]
    temperature_buffer.fill_(1.0)
    logits, labels = logits_and_labels(model, val_batches, device)
    if not len(labels):
        return 1.0, None, {}
    before = float(F.cross_entropy(logits, labels))
    t = fit_temperature(logits, labels)
    temperature_buffer.fill_(t)
    scaled = logits / t
    threshold = float(torch.quantile(ood_scores(scaled), OOD_QUANTILE))
    return t, threshold, {"temperature": t, "val_nll_before_calibration": before,
                          "val_nll_after_calibration": float(F.cross_entropy(scaled, labels))}
