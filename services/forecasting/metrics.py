"""Forecast metrics on standardized values (the published protocol), accumulated over batches."""

from __future__ import annotations

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

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no predictions were accumulated")
        return {"mse": self.sq / self.count, "mae": self.abs / self.count}


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred - target) ** 2).mean())


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).abs().mean())
