"""Losses and offline metrics of the robot policies (the shared trainer calls these)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.layers import unwrap

from .config import RobotPolicyConfig
from .model import DiffusionPolicy, EBTPolicy, PolicyBase, shift_chunk


def _normalized(policy: PolicyBase, batch: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    obs, previous, chunk = (t.to(device, non_blocking=True).float() for t in batch)
    norm = policy.normalizer
    return norm.obs(obs), norm.action(previous), norm.action(chunk)


def descent_starts(cfg: RobotPolicyConfig, previous: Tensor, target: Tensor) -> Tensor:
    """Where the training descent starts, per window: noise (std ``init_noise``); with probability
    ``warm_start_prob`` the previous demonstrated chunk shifted by ``action_exec`` steps plus a little noise (the
    warm start the policy gets at inference); with probability ``denoise_start_prob`` the demonstration itself
    plus noise of a random scale (so the descent learns the basin around it, not only the way from noise)."""
    batch = target.shape[0]
    init = torch.randn_like(target) * cfg.init_noise
    pick = torch.rand(batch, 1, 1, device=target.device)
    if cfg.warm_start_prob > 0:
        warm = shift_chunk(previous, cfg.action_exec) + 0.05 * torch.randn_like(target)
        init = torch.where(pick < cfg.warm_start_prob, warm, init)
    if cfg.denoise_start_prob > 0:
        scale = torch.rand(batch, 1, 1, device=target.device) * cfg.init_noise
        noised = target + scale * torch.randn_like(target)
        use = (pick >= cfg.warm_start_prob) & (pick < cfg.warm_start_prob + cfg.denoise_start_prob)
        init = torch.where(use, noised, init)
    return init


def ranking_loss(policy: EBTPolicy, obs: Tensor, target: Tensor, descended: Tensor,
                 demo_energy: Tensor | None = None) -> Tensor:
    """InfoNCE over energies: the demonstration must have the lowest energy among itself, the model's own
    descent result ``descended`` (detached: a hard negative where the descent stops short or averages modes)
    and ``ranking_negatives - 1`` noised copies of the demonstration (std ``ranking_noise`` times U(0.1, 1))."""
    cfg = policy.cfg
    batch = target.shape[0]
    negatives = [descended.detach()]
    for _ in range(cfg.ranking_negatives - 1):
        scale = cfg.ranking_noise * (0.1 + 0.9 * torch.rand(batch, 1, 1, device=target.device))
        negatives.append(target + scale * torch.randn_like(target))
    stacked = torch.stack(negatives, dim=1)  # (B, K, Ta, 2)
    k = stacked.shape[1]
    neg_energy = policy.energy(obs.repeat_interleave(k, dim=0), stacked.flatten(0, 1)).view(batch, k)
    if demo_energy is None:
        demo_energy = policy.energy(obs, target)
    logits = -torch.cat([demo_energy[:, None], neg_energy], dim=1)  # (B, 1 + K): class 0 is the demonstration
    return F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=target.device))


def ebt_loss(policy: EBTPolicy, obs: Tensor, previous: Tensor, target: Tensor) -> Tensor:
    """Behaviour cloning through the unrolled energy descent (MSE of every iterate), a margin that keeps
    E(demo) below E(start), and the ranking loss that makes the energy verify candidates."""
    cfg = policy.cfg
    init = descent_starts(cfg, previous, target)
    iterates, energies = policy(obs, init, cfg.train_steps, noise=cfg.langevin_noise, create_graph=True)
    loss = torch.stack([F.mse_loss(a, target) for a in iterates[1:]]).mean()
    demo_energy = policy.energy(obs, target) if cfg.energy_weight > 0 or cfg.ranking_weight > 0 else None
    if cfg.energy_weight > 0:
        assert demo_energy is not None
        loss = loss + cfg.energy_weight * F.relu(cfg.energy_margin + demo_energy - energies[0]).mean()
    if cfg.ranking_weight > 0:
        loss = loss + cfg.ranking_weight * ranking_loss(policy, obs, target, iterates[-1], demo_energy)
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
