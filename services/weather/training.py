"""Multi-step training loss and the trainer's validation metrics for WXFormer."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from shared.inferers import RolloutInferer
from shared.layers import unwrap


def weighted_mse(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Latitude-weighted MSE over (..., H, W) with ``weights`` (H, W) of mean 1."""
    return ((pred - target) ** 2 * weights).mean()


def rollout(model: Any, history: Tensor, forcing: Tensor, steps: int, hours: Tensor | None = None,
            detach: bool = False) -> list[Tensor]:
    """``steps`` autoregressive states from history (B, h, C, H, W) with forcings (B, >= steps + 1, F, H, W),
    through the shared :class:`~shared.inferers.RolloutInferer`: each step the network gives the change of the
    state, :meth:`WXFormer.advance` turns it into the next state (base state, calibration factors and, for a
    model relaxed toward the climatology, ``hours`` (B,): the UTC hour of the last history state).
    ``model`` may be wrapped (DDP): the network is called through the wrapper. ``detach``: every step after the
    first starts from a history cut from the graph (gradients do not flow from a step into earlier ones)."""
    bare: Any = unwrap(model)

    def step(states: Tensor, k: int) -> Tensor:
        if detach and k:
            states = states.detach()
        return bare.advance(states, model(states, forcing[:, k], forcing[:, k + 1]), k, hours)  # (B, C, H, W)

    # out of training, each spectrally normalized weight is the same at every step and every call of a layer:
    # computed once per rollout, not at every call (the same values)
    frozen = not torch.is_grad_enabled() and not bare.training
    with parametrize.cached() if frozen else contextlib.nullcontext():
        return RolloutInferer(steps)(step, history)


def unpack(batch: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(history, forcing, target, hours) of a window batch on ``device``; hours None for windows without it."""
    history, forcing, target = (t.to(device, non_blocking=True) for t in batch[:3])
    hours = batch[3].to(device) if len(batch) > 3 else None
    return history, forcing, target, hours


def rollout_loss(model: torch.nn.Module, batch: Any, device: torch.device) -> Tensor:
    """The latitude-weighted MSE averaged over the K autoregressive steps of the window (multi-step training).
    With ``rollout_gradient=full`` gradients flow through the whole rollout, so the model learns to keep its own
    errors small; with ``detached`` (CREDIT's default) each step learns from its own input state only."""
    history, forcing, target, hours = unpack(batch, device)
    bare: Any = unwrap(model)
    weights: Tensor = bare.lat_weights
    detach = bare.cfg.rollout_gradient == "detached"
    total = history.new_zeros(())
    for k, state in enumerate(rollout(model, history, forcing, target.shape[1], hours, detach=detach)):
        total = total + weighted_mse(state, target[:, k], weights)
    return total / target.shape[1]


def metric_sums(model: Any, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
    """Sums over the validation windows of the latitude-weighted squared error (normalized units) per rollout
    step, of the model (``stepK``) and of persistence (the initial state kept, ``persistence_stepK``), and the
    window count: additive, so workers' shares add up."""
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        history, forcing, target, hours = unpack(batch, device)
        states = rollout(model, history, forcing, target.shape[1], hours)
        n = history.shape[0]
        w = model.lat_weights
        for k, state in enumerate(states):
            mse = ((state.float() - target[:, k]) ** 2 * w).mean(dim=(1, 2, 3))  # (B,)
            sums[f"step{k + 1}"] = sums.get(f"step{k + 1}", 0.0) + float(mse.sum())
            persistence = ((history[:, -1] - target[:, k]) ** 2 * w).mean(dim=(1, 2, 3))
            sums[f"persistence_step{k + 1}"] = sums.get(f"persistence_step{k + 1}", 0.0) + float(persistence.sum())
        count += n
    return {**sums, "count": float(count)}


def metrics_from(sums: Mapping[str, float]) -> dict[str, float]:
    """Latitude-weighted RMSE from :func:`metric_sums`: overall (``wrmse``, the promotion metric), per rollout
    step, and persistence's at every step."""
    count = int(sums.get("count", 0))
    steps = sorted(k for k in sums if k.startswith("step"))
    out = {f"wrmse_{k}": (sums[k] / max(1, count)) ** 0.5 for k in steps}
    out["wrmse"] = (sum(sums[k] for k in steps) / max(1, count * len(steps))) ** 0.5
    out.update({f"wrmse_persistence_{k}": (sums[f"persistence_{k}"] / max(1, count)) ** 0.5 for k in steps})
    return out


def bounded_least_squares(gram: Tensor, rhs: Tensor) -> Tensor:
    """argmin over x in [0, 1]^2 of x' G x - 2 b' x, for each of C problems: ``gram`` (C, 2, 2), ``rhs`` (C, 2).
    The minimum is the unconstrained one when it is inside the box, else on an edge or a corner: every
    candidate is tried and the best feasible one kept. A direction with no signal (zero diagonal) gets 0."""
    cands = []
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] ** 2
    inner = torch.stack([gram[:, 1, 1] * rhs[:, 0] - gram[:, 0, 1] * rhs[:, 1],
                         gram[:, 0, 0] * rhs[:, 1] - gram[:, 0, 1] * rhs[:, 0]], dim=1) / det.clamp_min(1e-30)[:, None]
    cands.append(torch.where((det > 1e-12 * (gram[:, 0, 0] * gram[:, 1, 1]).clamp_min(1e-30))[:, None], inner,
                             torch.full_like(inner, float("nan"))))
    for i in (0, 1):  # one factor on a bound (0 or 1), the other fitted and clipped
        j = 1 - i
        for bound in (0.0, 1.0):
            other = ((rhs[:, j] - bound * gram[:, i, j]) / gram[:, j, j].clamp_min(1e-30)).clamp(0.0, 1.0)
            other = torch.where(gram[:, j, j] > 0, other, torch.zeros_like(other))
            x = torch.empty_like(rhs)
            x[:, i], x[:, j] = bound, other
            cands.append(x)
    best, best_loss = torch.zeros_like(rhs), torch.zeros_like(rhs[:, 0])  # x = 0: loss 0
    for x in cands:
        feasible = (x >= 0).all(dim=1) & (x <= 1).all(dim=1)
        loss = torch.einsum("ci,cij,cj->c", x, gram, x) - 2 * (rhs * x).sum(dim=1)
        better = feasible & (loss < best_loss)
        best = torch.where(better[:, None], x, best)
        best_loss = torch.where(better, loss, best_loss)
    return best


# The least number of validation windows a step's calibration factors are fitted on (a day of hourly starts):
# steps past the training rollout are fitted as far as the validation period keeps this many windows reaching them
CALIBRATION_WINDOWS = 24


def _window_steps(batches: Collection[Any]) -> int:
    """Target steps of the windows of ``batches`` (a loader over a RolloutDataset, or a list of batches)."""
    dataset = getattr(batches, "dataset", None)
    if dataset is not None and hasattr(dataset, "rollout"):
        return int(dataset.rollout)
    return max((int(batch[2].shape[1]) for batch in batches), default=0)


@torch.no_grad()
def fit_calibration(model: Any, batches: Collection[Any], device: torch.device, steps: int,
                    damping: bool = True, relaxation: bool = True,
                    longer: Iterable[Any] | None = None) -> tuple[Tensor, Tensor]:
    """Per rollout step and channel, a damping factor on the predicted change and a relaxation factor toward
    the climatology, both in [0, 1], fitted on ``batches`` (the validation windows, a loader or list: read
    once per step, one batch on the device at a time). Returns ((steps, C), (steps, C)) and sets them on
    ``model``. ``longer``: windows with more target steps (fewer of them, from the same period), used for the
    steps that ``batches`` do not reach, so that the first steps' factors are the same with or without it.

    Step by step, with the factors of the earlier steps applied: the latitude-weighted least-squares fit of the
    true change (target minus the base state) by ``a * predicted change + r * pull`` for each channel (pull: the
    climatology minus the base, :meth:`WXFormer.pull`), bounded to [0, 1] (a damping above 1 would amplify the
    network's errors over a long rollout). With ``damping`` off a stays 1; with ``relaxation`` off, or a model
    without a climatology, r stays 0."""
    lag = int(getattr(model, "base_lag", 1))
    weights = model.lat_weights
    relaxation = relaxation and len(getattr(model, "climatology", ())) > 0
    c = model.n_channels
    damp = torch.ones(0, c, device=device)
    relax = torch.zeros(0, c, device=device)
    reach = _window_steps(batches)
    for k in range(steps):
        source = batches if longer is None or k < reach else longer
        model.set_damping(torch.cat([damp, torch.ones(1, c, device=device)]))
        if relaxation:
            model.set_relaxation(torch.cat([relax, torch.zeros(1, c, device=device)]))
        gram = torch.zeros(c, 2, 2, dtype=torch.float64, device=device)
        rhs = torch.zeros(c, 2, dtype=torch.float64, device=device)
        for batch in source:
            history, forcing, target, hours = unpack(batch, device)
            if target.shape[1] <= k:
                continue
            states = rollout(model, history, forcing, k, hours) if k else []
            history = torch.cat([history, *(s[:, None] for s in states)], dim=1)[:, -history.shape[1]:]
            base = history[:, -lag]
            feats = [model(history, forcing[:, k], forcing[:, k + 1]).double()]
            feats.append(model.pull(base, hours + (k + 1) * model.step_hours).double() if relaxation
                         else torch.zeros_like(feats[0]))
            true = (target[:, k] - base).double()
            for i in range(2):
                rhs[:, i] += (true * feats[i] * weights).sum(dim=(0, 2, 3))
                for j in range(2):
                    gram[:, i, j] += (feats[i] * feats[j] * weights).sum(dim=(0, 2, 3))
        if not damping:  # a fixed at 1: fit r alone on what the change leaves
            rhs[:, 1] -= gram[:, 0, 1]
            gram[:, 0, 1] = gram[:, 1, 0] = 0.0
            gram[:, 0, 0] = 1.0
            rhs[:, 0] = 1.0
        fitted = bounded_least_squares(gram, rhs).float()
        if damping:
            no_change = gram[:, 0, 0] == 0  # a channel the network never changes keeps 1
            fitted[:, 0] = torch.where(no_change, torch.ones_like(fitted[:, 0]), fitted[:, 0])
        damp = torch.cat([damp, fitted[None, :, 0]])
        relax = torch.cat([relax, fitted[None, :, 1]])
    model.set_damping(damp)
    model.set_relaxation(relax if relaxation else torch.zeros(0, c, device=device))
    return damp, relax
