"""Closed-loop evaluation in gym-pusht: seeded episodes in parallel Ray tasks, a GIF, energy plots, OOD check.

Protocol (Diffusion Policy / LeRobot Push-T): episodes from seeds ``seed_start + i``, at most ``max_steps``
environment steps, replanning every ``action_exec`` steps; success when coverage exceeds 0.95 (the episode
ends there). The score is the mean over episodes of the maximum reward reached, reward = clip(coverage / 0.95,
0, 1) (what Diffusion Policy and LeRobot publish); the mean of the maximum coverage is reported beside it.

Two initial-state protocols for the same seeds: ``legacy``, Diffusion Policy's own (gym-pusht 0.1.5 and DP's
``PushTEnv`` draw the state from ``np.random.RandomState(seed)``), and ``gym``, gym-pusht 0.1.8's reset (drawn
from the environment's ``np_random``): the same seed puts the agent and the block elsewhere.
"""

from __future__ import annotations

import io
import time
from collections import deque
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.registry import EvaluationResult

from .config import RobotPolicyConfig, RobotPolicyEvalConfig
from .data import RobotPolicyState
from .model import EBTPolicy, PolicyBase

GIF_SIZE = 192
RESETS = ("legacy", "gym")


def legacy_initial_state(seed: int) -> np.ndarray:
    """Diffusion Policy's initial Push-T state for ``seed``, drawn in this order from
    ``np.random.RandomState(seed)``: agent x, y integers in [50, 450), block x, y integers in [100, 400), block
    angle ``randn() * 2 pi - pi`` (a normal draw, as DP's ``PushTEnv.reset`` has it, not a uniform one)."""
    rs = np.random.RandomState(seed)
    return np.array([rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400),
                     rs.randn() * 2 * np.pi - np.pi], dtype=np.float64)


def reset_env(env: Any, seed: int, reset: str = "legacy") -> tuple[Any, dict[str, Any]]:
    """Reset ``env`` for ``seed`` under one of :data:`RESETS`."""
    if reset == "legacy":
        return env.reset(seed=seed, options={"reset_to_state": legacy_initial_state(seed)})
    if reset == "gym":
        return env.reset(seed=seed)
    raise ValueError(f"reset={reset!r}: expected one of {list(RESETS)}")


def rollout(policy: PolicyBase, seed: int, *, max_steps: int = 300, steps: int | None = None,
            candidates: int | None = None, record: bool = False, reset: str = "legacy",
            escalate: dict[str, Any] | None = None) -> dict[str, Any]:
    """One seeded episode; returns max reward and coverage, success, per-chunk energies/latencies and
    optional frames."""
    from .data import make_env

    cfg = policy.cfg
    env = make_env(render=record, size=GIF_SIZE)
    generator = torch.Generator().manual_seed(seed)
    obs, _ = reset_env(env, seed, reset)
    history = deque([obs] * cfg.obs_horizon, maxlen=cfg.obs_horizon)
    previous: torch.Tensor | None = None
    max_cov, max_reward, success, t = 0.0, 0.0, False, 0
    energies, latencies, steps_used, traces, coverage, frames = [], [], [], [], [], []
    if record:
        frames.append(env.render())
    try:
        while t < max_steps and not success:
            obs_t = torch.as_tensor(np.stack(history), dtype=torch.float32)[None]
            started = time.perf_counter()
            plan = policy.plan(obs_t, previous, steps=steps, candidates=candidates, generator=generator,
                               **(escalate or {}))
            latencies.append((time.perf_counter() - started) * 1000)
            energies.append(float(plan.energy[0]))
            steps_used.append(plan.steps)
            traces.append(plan.energy_trace)
            for action in plan.actions[0, :cfg.action_exec].numpy():
                obs, reward, terminated, truncated, info = env.step(action)
                t += 1
                history.append(obs)
                max_cov = max(max_cov, float(info["coverage"]))
                max_reward = max(max_reward, float(reward))
                coverage.append(float(info["coverage"]))
                if record:
                    frames.append(env.render())
                if terminated:
                    success = True
                if terminated or truncated or t >= max_steps:
                    break
            previous = plan.actions
    finally:
        env.close()
    return {"seed": seed, "reset": reset, "max_coverage": max_cov, "max_reward": max_reward, "success": success,
            "steps": t, "energies": energies,
            "latency_ms": latencies, "descent_steps": steps_used, "traces": traces, "coverage": coverage,
            "frames": frames, "passes": plan.passes if latencies else 0}


def _rollouts(policy: PolicyBase, seeds: list[int], record: set[int], **kw: Any) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per rollout task
    try:
        return [rollout(policy, s, record=s in record, **kw) for s in seeds]
    finally:
        torch.set_num_threads(threads)


def _remote_rollouts(cfg_dict: dict[str, Any], saved: RobotPolicyState, weights: dict[str, torch.Tensor],
                     seeds: list[int], record: set[int], kw: dict[str, Any]) -> list[dict[str, Any]]:
    from shared.config import from_dict

    from .model import build

    policy = build(from_dict(RobotPolicyConfig, cfg_dict), saved)
    policy.load_state_dict(weights)
    return _rollouts(policy.eval(), seeds, record, **kw)


def run_episodes(policy: PolicyBase, saved: RobotPolicyState, seeds: list[int], record: set[int], workers: int,
                 **kw: Any) -> list[dict[str, Any]]:
    """Episodes split over ``workers`` Ray tasks (1 CPU each); ``workers == 1`` runs them in this process."""
    if workers <= 1 or len(seeds) <= 1:
        return _rollouts(policy, seeds, record, **kw)
    from shared.cluster import connect_ray
    from shared.config import to_dict

    ray = connect_ray()
    task = ray.remote(num_cpus=1)(_remote_rollouts)
    weights = ray.put({k: v.detach().cpu() for k, v in policy.state_dict().items()})
    shards = [seeds[i::workers] for i in range(workers)]
    futures = [task.remote(to_dict(policy.cfg), saved, weights, shard, record, kw) for shard in shards if shard]
    results = [r for shard in ray.get(futures) for r in shard]
    return sorted(results, key=lambda r: r["seed"])


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC."""
    scores = np.concatenate([negatives, positives])
    ranks = scores.argsort().argsort() + 1.0
    # average ranks over ties
    for value in np.unique(scores):
        tie = scores == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    n_neg, n_pos = len(negatives), len(positives)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_neg * n_pos))


def perturb(obs: torch.Tensor, generator: torch.Generator, scale: float = 60.0) -> torch.Tensor:
    """Out-of-distribution histories: each frame's positions jittered independently by N(0, scale) pixels
    (inconsistent motion between frames, agent/block configurations the demonstrations never show)."""
    noisy = obs.clone()
    noisy[..., :4] += torch.randn(noisy[..., :4].shape, generator=generator) * scale
    noisy[..., :4] = noisy[..., :4].clamp(10.0, 502.0)
    return noisy


OOD_SCALES = (30.0, 60.0, 120.0)  # pixels of jitter; 60 is the headline figure


def energy_uncertainty(policy: EBTPolicy, obs: torch.Tensor, seed: int = 0,
                       scales: tuple[float, ...] = OOD_SCALES) -> dict[str, Any]:
    """Final energies of planned chunks on in-distribution histories and on copies perturbed at each scale."""
    generator = torch.Generator().manual_seed(seed)
    in_energy = policy.plan(obs, None, generator=generator).energy.numpy()
    ood = {}
    for scale in scales:
        noisy = perturb(obs, generator, scale)
        ood[scale] = policy.plan(noisy, None, generator=generator).energy.numpy()
    return {"in": in_energy, "ood": ood, "auroc": {scale: auroc(in_energy, e) for scale, e in ood.items()}}


def _gif(frames: list[list[np.ndarray]]) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f) for episode in frames for f in episode[::2]]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buffer.getvalue()


def _held_out_histories(cfg: RobotPolicyConfig, data: str | None, samples: int) -> torch.Tensor:
    """Up to ``samples`` observation histories of the held-out (test and validation) demonstration windows."""
    from torch.utils.data import ConcatDataset

    from shared import registry

    split = registry.get("robot_policy").load_data(cfg.replace(data=data or cfg.data))
    windows: ConcatDataset[Any] = ConcatDataset([split.test, split.val])  # type: ignore[list-item]
    pick = np.random.default_rng(0).choice(len(windows), min(len(windows), samples), replace=False)
    return torch.stack([windows[int(i)][0] for i in pick])


def _escalation(policy: EBTPolicy, saved: RobotPolicyState, held_out: torch.Tensor, seeds: list[int], workers: int,
                settings: RobotPolicyEvalConfig, steps: int, candidates: int | None) -> dict[str, float]:
    """Energy-triggered extra compute on the headline protocol: a chunk whose final energy after ``steps``
    steps is above the ``escalate_quantile`` quantile of the held-out demonstrations' final energies (same
    budget) is planned again with ``escalate_steps`` steps and ``escalate_candidates`` candidates."""
    generator = torch.Generator().manual_seed(0)
    energies = policy.plan(held_out, None, steps=steps, candidates=candidates, generator=generator).energy
    threshold = float(torch.quantile(energies.double(), settings.escalate_quantile))
    escalate = {"escalate_above": threshold, "escalate_steps": settings.escalate_steps,
                "escalate_candidates": settings.escalate_candidates}
    runs = run_episodes(policy, saved, seeds, set(), workers, max_steps=settings.max_steps, steps=steps,
                        candidates=candidates, reset=settings.resets[0], escalate=escalate)
    score = _score(runs)
    used = np.concatenate([r["descent_steps"] for r in runs])
    score.update(threshold=threshold, descent_steps=float(used.mean()),
                 escalated_fraction=float((used > steps).mean()))
    print(f"  energy-triggered extra compute ({settings.resets[0]} initial states, {steps} steps, above the "
          f"{settings.escalate_quantile:g} quantile {threshold:.3f}: {settings.escalate_steps} more steps x "
          f"{settings.escalate_candidates} candidates): mean max reward {score['mean_max_reward']:.3f} ± "
          f"{score['mean_max_reward_se']:.3f}, {score['descent_steps']:.2f} steps per chunk, "
          f"{score['escalated_fraction']:.0%} of chunks escalated", flush=True)
    return score


def _score(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of the per-episode maximum reward and coverage with their standard errors over episodes, and the
    success rate."""
    out: dict[str, float] = {"success_rate": float(np.mean([r["success"] for r in results]))}
    for key in ("reward", "coverage"):
        values = np.array([r[f"max_{key}"] for r in results], dtype=np.float64)
        out[f"mean_max_{key}"] = float(values.mean())
        out[f"mean_max_{key}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return out


def evaluate_policy(model: nn.Module, cfg: RobotPolicyConfig, saved: RobotPolicyState, data: str | None,
                    settings: RobotPolicyEvalConfig) -> EvaluationResult:
    """Every initial-state protocol of ``settings.resets`` times every descent budget of
    ``settings.descent_steps`` (EBT; the diffusion baseline has one budget), on the same seeds; the first
    protocol and budget are the headline figures."""
    from .plots import energy_descent_figure, ood_figure

    policy = model
    assert isinstance(policy, PolicyBase)
    episodes = settings.episodes
    seeds = [settings.seed_start + i for i in range(episodes)]
    candidates = settings.candidates or None
    budgets = [s or cfg.infer_steps for s in settings.descent_steps] if policy.kind == "ebt" else [0]
    budgets = list(dict.fromkeys(budgets))  # unique, first kept
    workers = settings.workers
    if workers == 0:
        from shared.cluster import connect_ray

        ray = connect_ray()
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(workers, episodes)
    print(f"robot_policy: {episodes} episodes (seeds {seeds[0]}..{seeds[-1]}) on {workers} worker(s); initial "
          f"states {', '.join(settings.resets)}; descent steps {', '.join(map(str, budgets))}", flush=True)
    started = time.perf_counter()
    table: dict[str, dict[str, dict[str, float]]] = {}
    results: list[dict[str, Any]] = []
    for reset in settings.resets:
        for budget in budgets:
            headline = not results
            record = set(seeds[:settings.gif_episodes]) if headline else set()
            runs = run_episodes(policy, saved, seeds, record, workers, max_steps=settings.max_steps,
                                steps=budget or None, candidates=candidates, reset=reset)
            score = _score(runs)
            used = np.concatenate([r["descent_steps"] for r in runs])
            score["descent_steps"] = float(used.mean()) if policy.kind == "ebt" else 0.0
            table.setdefault(reset, {})[f"steps_{budget}" if budget else "denoising"] = score
            print(f"  {reset} initial states, {budget or cfg.diffusion_steps} "
                  f"{'descent' if budget else 'denoising'} steps: mean max reward {score['mean_max_reward']:.3f} "
                  f"± {score['mean_max_reward_se']:.3f}, coverage {score['mean_max_coverage']:.3f}, success "
                  f"{score['success_rate']:.2f}", flush=True)
            if headline:
                results = runs
    elapsed = time.perf_counter() - started
    latencies = np.concatenate([r["latency_ms"] for r in results])
    used = np.concatenate([r["descent_steps"] for r in results])
    metrics: dict[str, Any] = {
        "model": policy.kind,
        "episodes": episodes,
        "initial_states": settings.resets[0],
        **_score(results),
        "descent_steps": float(used.mean()) if policy.kind == "ebt" else 0.0,
        "max_descent_steps": budgets[0],
        "denoising_steps": 0 if policy.kind == "ebt" else cfg.diffusion_steps,
        "candidates": int(candidates or cfg.candidates) if policy.kind == "ebt" else 1,
        "passes_per_chunk": float(np.mean([r["passes"] for r in results])),
        "latency_ms_per_chunk": float(np.median(latencies)),
        "latency_ms_per_chunk_p90": float(np.percentile(latencies, 90)),
        "eval_seconds": elapsed,
        "by_initial_states": table,
    }
    print(f"success {metrics['success_rate']:.2f}, mean max reward {metrics['mean_max_reward']:.3f}, mean max "
          f"coverage {metrics['mean_max_coverage']:.3f}, {metrics['latency_ms_per_chunk']:.1f} ms/chunk, "
          f"{elapsed:.0f}s", flush=True)
    record = set(seeds[:settings.gif_episodes])
    figures: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    if record:
        files["rollouts.gif"] = _gif([r["frames"] for r in results if r["frames"]])
    if isinstance(policy, EBTPolicy):
        shown = results[:3]
        figures["energy_vs_step.png"] = energy_descent_figure(
            [t for r in results for t in r["traces"]], [r["energies"] for r in shown], [r["coverage"] for r in shown])
        obs = _held_out_histories(cfg, data, settings.ood_samples)
        # energy as uncertainty: held-out demonstration histories vs perturbed copies
        ood = energy_uncertainty(policy, obs)
        metrics.update(energy_in_distribution=float(ood["in"].mean()),
                       energy_perturbed=float(ood["ood"][60.0].mean()), energy_ood_auroc=ood["auroc"][60.0],
                       energy_ood_auroc_by_jitter_px={f"{k:g}": v for k, v in ood["auroc"].items()})
        figures["energy_ood.png"] = ood_figure(ood["in"], ood["ood"], ood["auroc"])
        if settings.escalate_quantile > 0:
            metrics["escalation"] = _escalation(policy, saved, obs, seeds, workers, settings, budgets[0], candidates)
    metrics["per_episode_max_reward"] = [round(r["max_reward"], 4) for r in results]
    metrics["per_episode_max_coverage"] = [round(r["max_coverage"], 4) for r in results]
    return EvaluationResult(metrics=metrics, figures=figures, files=files)
