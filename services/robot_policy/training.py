"""Losses and offline metrics of the robot policies (the shared trainer calls these)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.tracking import unwrap

from .model import DiffusionPolicy, EBTPolicy, PolicyBase, shift_chunk


def _normalized(policy: PolicyBase, batch: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    obs, previous, chunk = (t.to(device, non_blocking=True).float() for t in batch)
    norm = policy.normalizer
    return norm.obs(obs), norm.action(previous), norm.action(chunk)


def ebt_loss(policy: EBTPolicy, obs: Tensor, previous: Tensor, target: Tensor) -> Tensor:
    """Behaviour cloning through the unrolled energy descent, plus a margin that keeps E(demo) below E(start).

    The start is noise, or (with probability ``warm_start_prob``) the previous demonstrated chunk shifted by
    ``action_exec`` steps plus a little noise: the warm start the policy gets at inference.
    """
    cfg = policy.cfg
    batch = obs.shape[0]
    init = torch.randn_like(target) * cfg.init_noise
    if cfg.warm_start_prob > 0:
        warm = shift_chunk(previous, cfg.action_exec) + 0.05 * torch.randn_like(target)
        use = torch.rand(batch, 1, 1, device=obs.device) < cfg.warm_start_prob
        init = torch.where(use, warm, init)
    iterates, energies = policy(obs, init, cfg.train_steps, noise=cfg.langevin_noise, create_graph=True)
    loss = torch.stack([F.mse_loss(a, target) for a in iterates[1:]]).mean()
    if cfg.energy_weight > 0:
        demo_energy = policy.energy(obs, target)
        loss = loss + cfg.energy_weight * F.relu(cfg.energy_margin + demo_energy - energies[0]).mean()
    return loss


def policy_loss(model: nn.Module, batch: Any, device: torch.device) -> Tensor:
    policy = unwrap(model)
    obs, previous, target = _normalized(policy, batch, device)  # type: ignore[arg-type]
    if isinstance(policy, EBTPolicy):
        return ebt_loss(policy, obs, previous, target)  # never DDP-wrapped (supports_ddp)
    assert isinstance(policy, DiffusionPolicy)
    return policy.loss(obs, target)


def metric_sums(model: nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
    """Planned chunk vs the demonstrated one on held-out windows (normalized units, from noise, seeded): the
    summed squared errors over the whole chunk and its executed part, the window and batch counts, and for EBT
    the summed final energies and descent steps (additive, so workers' shares add up)."""
    policy = unwrap(model)
    assert isinstance(policy, PolicyBase)
    generator = torch.Generator(device=device).manual_seed(0)
    total = total_exec = energy = steps = 0.0
    count = batches_seen = 0
    exec_steps = policy.cfg.action_exec
    for batch in batches:
        obs, _, chunk = (t.to(device).float() for t in batch)
        plan = policy.plan(obs, None, generator=generator)
        err = (policy.normalizer.action(plan.actions) - policy.normalizer.action(chunk)) ** 2  # (B, Ta, 2)
        total += float(err.mean(dim=(1, 2)).sum())
        total_exec += float(err[:, :exec_steps].mean(dim=(1, 2)).sum())
        energy += float(plan.energy.sum())
        steps += plan.steps
        count += obs.shape[0]
        batches_seen += 1
    sums = {"squared_error": total, "squared_error_exec": total_exec, "count": float(count),
            "batches": float(batches_seen)}
    if isinstance(policy, EBTPolicy):
        sums.update(final_energy=energy, descent_steps=steps)
    return sums


def metrics_from(sums: Mapping[str, float]) -> dict[str, float]:
    """``action_mse`` over the whole chunk, ``action_mse_exec`` over the executed part; for EBT also the mean
    final energy and the descent steps taken per chunk."""
    count, batches = int(sums.get("count", 0)), int(sums.get("batches", 0))
    metrics = {"action_mse": sums["squared_error"] / max(1, count),
               "action_mse_exec": sums["squared_error_exec"] / max(1, count)}
    if "final_energy" in sums:
        metrics.update(final_energy=sums["final_energy"] / max(1, count),
                       descent_steps=sums["descent_steps"] / max(1, batches))
    return metrics
