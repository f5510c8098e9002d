"""Multi-step training loss and the trainer's validation metrics for WXFormer."""

from __future__ import annotations

from collections.abc import Collection, Iterable
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
    steps before the target (a day earlier with ``residual_base="day"``), scaled by the model's damping factors
    when it has them (``fit_damping``). ``model`` may be wrapped (DDP)."""
    bare = unwrap(model)
    lag = int(getattr(bare, "base_lag", 1))
    step_scale = getattr(bare, "step_scale", None)
    states = []
    for k in range(steps):
        change = model(history, forcing[:, k], forcing[:, k + 1])  # (B, C, H, W)
        scale = step_scale(k) if step_scale is not None else None
        nxt = history[:, -lag] + (change if scale is None else scale.to(change.dtype) * change)
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


@torch.no_grad()
def fit_damping(model: Any, batches: Collection[Any], device: torch.device, steps: int) -> Tensor:
    """(steps, C) factors in [0, 1] on the predicted change, fitted on ``batches`` (the validation windows, a
    loader or list: read once per step, one batch on the device at a time).

    Step by step: with the factors of the earlier steps applied, the factor of step k and channel c is the
    latitude-weighted least-squares fit of the true change (target minus the base state) by the predicted one,
    clipped to [0, 1] (a factor above 1 would amplify the network's errors over a long rollout). A channel whose
    predicted change is zero keeps 1."""
    lag = int(getattr(model, "base_lag", 1))
    weights = model.lat_weights
    factors = torch.ones(0, model.n_channels, device=device)
    for k in range(steps):
        model.set_damping(torch.cat([factors, torch.ones(1, model.n_channels, device=device)]))
        num = torch.zeros(model.n_channels, dtype=torch.float64, device=device)
        den = torch.zeros_like(num)
        for batch in batches:
            history, forcing, target = (t.to(device) for t in batch)
            if target.shape[1] <= k:
                continue
            states = rollout(model, history, forcing, k) if k else []
            history = torch.cat([history, *(s[:, None] for s in states)], dim=1)[:, -history.shape[1]:]
            base = history[:, -lag]
            change = model(history, forcing[:, k], forcing[:, k + 1]).double()
            true = (target[:, k] - base).double()
            num += (true * change * weights).sum(dim=(0, 2, 3))
            den += (change * change * weights).sum(dim=(0, 2, 3))
        fitted = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num)).clamp(0.0, 1.0)
        factors = torch.cat([factors, fitted[None].float()])
    model.set_damping(factors)
    return factors
