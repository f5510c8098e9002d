"""The robot_policy domain: EBT-Policy (and a diffusion baseline) on Push-T, evaluated in gym-pusht."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import apply_overrides
from shared.registry import DataBundle, Domain, EvaluationResult, register

from .config import MODELS, RobotPolicyConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

EVAL_SETTINGS: dict[str, Any] = {
    "episodes": 50,  # seeded episodes
    "seed_start": 100_000,  # episode i uses seed seed_start + i
    "max_steps": 300,  # environment steps per episode
    "descent_steps": 0,  # 0: the model's infer_steps
    "candidates": 0,  # 0: the model's candidates
    "gif_episodes": 3,  # episodes recorded into the rollout GIF
    "ood_samples": 512,  # observation histories for the energy-as-uncertainty check
    "workers": 0,  # parallel rollout tasks on Ray; 0: one per CPU of the cluster, 1: in this process
}


@register
class RobotPolicy(Domain):
    name = "robot_policy"
    models = MODELS
    port = 3005
    endpoint = "/act"
    service = "services.robot_policy.service:RobotPolicy"
    config_cls = RobotPolicyConfig
    val_metric = "action_mse"
    eval_settings = EVAL_SETTINGS
    eval_score = ("mean_max_coverage", True)  # closed loop: open-loop action MSE does not rank policies

    def make_config(self, model: str | None = None, data: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> RobotPolicyConfig:
        overrides = dict(overrides or {})
        model = model or overrides.pop("model", None) or MODELS[0]
        cfg = RobotPolicyConfig(model=str(model), data=str(Path(data).resolve()) if data else None)
        return apply_overrides(cfg, overrides)

    def load_data(self, cfg: RobotPolicyConfig) -> DataBundle:
        from .data import (
            WindowDataset,
            fit_normalizer,
            read_replay_buffer,
            split_episodes,
            synthetic_demonstrations,
        )

        demos = (read_replay_buffer(cfg.data) if cfg.data else
                 synthetic_demonstrations(cfg.synthetic_episodes, seed=cfg.seed))
        bounds = demos.episode_bounds()
        ids = split_episodes(demos.n_episodes, cfg.val_fraction, cfg.seed)
        parts = [[bounds[i] for i in split] for split in ids]
        stats = fit_normalizer(demos, parts[0])
        info = {"normalizer": stats, "fingerprint": demos.fingerprint, "data": demos.name,
                "episodes": {"train": ids[0], "val": ids[1], "test": ids[2]}}
        datasets = [WindowDataset(demos, p, cfg.obs_horizon, cfg.action_horizon, cfg.action_exec) for p in parts]
        return DataBundle(train=datasets[0], val=datasets[1], test=datasets[2], info=info)

    def build_model(self, cfg: RobotPolicyConfig, info: Mapping[str, Any]) -> torch.nn.Module:
        from .model import build

        return build(cfg, dict(info["normalizer"]))

    def supports_ddp(self, cfg: RobotPolicyConfig) -> bool:
        return cfg.model != "ebt"  # EBT trains through its own gradient (double backward)

    def eval_signature(self, cfg: RobotPolicyConfig, info: Mapping[str, Any]) -> str:
        return (f"{info['fingerprint']}:val{sorted(info['episodes']['val'])}:To{cfg.obs_horizon}"
                f":Ta{cfg.action_horizon}")

    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        from .training import policy_loss

        return policy_loss(model, batch, device)

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        from .training import offline_metrics

        return offline_metrics(model, batches, device)

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        from .plots import chunk_figure

        return {"chunks_vs_demonstrations.png": chunk_figure(model, data.test)}

    def evaluation(self, model: torch.nn.Module, cfg: Any, info: Mapping[str, Any], data: str | None,
                   settings: Mapping[str, Any]) -> EvaluationResult:
        from .evaluation import evaluate_policy

        return evaluate_policy(model, cfg, info, data, settings)
