"""Multi-step training loss and the trainer's validation metrics for WXFormer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from shared.tracking import unwrap


def weighted_mse(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Latitude-weighted MSE over (..., H, W) with ``weights`` (H, W) of mean 1."""
    return ((pred - target) ** 2 * weights).mean()


def rollout(model: Any, history: Tensor, forcing: Tensor, steps: int) -> list[Tensor]:
    """``steps`` autoregressive states from history (B, h, C, H, W) with forcings (B, >= steps + 1, F, H, W).
    The network gives the change from its base state: the last one, or with ``base_lag`` n > 1 the state n
    steps before the target (a day earlier with ``residual_base="day"``). ``model`` may be wrapped (DDP)."""
    lag = int(getattr(unwrap(model), "base_lag", 1))
    states = []
    for k in range(steps):
        nxt = history[:, -lag] + model(history, forcing[:, k], forcing[:, k + 1])  # (B, C, H, W)
        states.append(nxt)
        history = torch.cat([history[:, 1:], nxt[:, None]], dim=1)
    return states


def rollout_loss(model: torch.nn.Module, batch: Any, device: torch.device) -> Tensor:
    """The latitude-weighted MSE summed over the K autoregressive steps of the window (CREDIT's multi-step
    training: gradients flow through the whole rollout, so the model learns to keep its own errors small)."""
    history, forcing, target = (t.to(device, non_blocking=True) for t in batch)
    weights: Tensor = unwrap(model).lat_weights  # type: ignore[assignment]
    total = history.new_zeros(())
    for k, state in enumerate(rollout(model, history, forcing, target.shape[1])):
        total = total + weighted_mse(state, target[:, k], weights)
    return total / target.shape[1]


def offline_metrics(model: Any, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
    """Latitude-weighted RMSE in normalized units over the validation windows: overall (``wrmse``, the
    promotion metric), per rollout step, and persistence (the initial state kept) at every step."""
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        history, forcing, target = (t.to(device) for t in batch)
        states = rollout(model, history, forcing, target.shape[1])
        n = history.shape[0]
        w = model.lat_weights
        for k, state in enumerate(states):
            mse = ((state.float() - target[:, k]) ** 2 * w).mean(dim=(1, 2, 3))  # (B,)
            sums[f"step{k + 1}"] = sums.get(f"step{k + 1}", 0.0) + float(mse.sum())
            persistence = ((history[:, -1] - target[:, k]) ** 2 * w).mean(dim=(1, 2, 3))
            sums[f"persistence_step{k + 1}"] = sums.get(f"persistence_step{k + 1}", 0.0) + float(persistence.sum())
        count += n
    steps = sorted(k for k in sums if k.startswith("step"))
    out = {f"wrmse_{k}": (sums[k] / max(1, count)) ** 0.5 for k in steps}
    out["wrmse"] = (sum(sums[k] for k in steps) / max(1, count * len(steps))) ** 0.5
    out.update({f"wrmse_persistence_{k}": (sums[f"persistence_{k}"] / max(1, count)) ** 0.5 for k in steps})
    return out
