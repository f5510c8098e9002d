"""Forecast metrics on standardized values (the published protocol), accumulated over batches."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ErrorAccumulator:
    """Running MSE / MAE over many batches without keeping the predictions."""

    def __init__(self) -> None:
        self.sq = 0.0
        self.abs = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        diff = (pred.detach().float() - target.float())
        self.sq += float((diff * diff).sum())
        self.abs += float(diff.abs().sum())
        self.count += diff.numel()

    def sums(self) -> dict[str, float]:
        """Additive totals (the trainer adds them up over workers)."""
        return {"squared_error": self.sq, "absolute_error": self.abs, "count": float(self.count)}

    @staticmethod
    def compute(sums: Mapping[str, float]) -> dict[str, float]:
        if not sums.get("count"):
            raise ValueError("no predictions were accumulated")
        return {"mse": sums["squared_error"] / sums["count"], "mae": sums["absolute_error"] / sums["count"]}


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred - target) ** 2).mean())


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).abs().mean())
