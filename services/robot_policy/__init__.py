"""The robot_policy domain: EBT-Policy (and a diffusion baseline) on Push-T, evaluated in gym-pusht."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.registry import DataBundle, DemoJob, Domain, EvaluationResult, Prediction, register

from .config import MODELS, RobotPolicyConfig, RobotPolicyEvalConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .data import RobotPolicyState


@register
class RobotPolicyDomain(Domain):
    name = "robot_policy"
    models = MODELS
    port = 3005
    endpoint = "/act"
    service = "services.robot_policy.service:RobotPolicy"
    config_cls = RobotPolicyConfig
    saved_state = "services.robot_policy.data:RobotPolicyState"
    eval_config_cls = RobotPolicyEvalConfig
    val_metric = "action_mse"
    eval_score = ("mean_max_reward", True)  # closed loop (DP's score): open-loop action MSE does not rank policies
    requires = ("gymnasium", "gym_pusht", "zarr")
    data_suffixes = (".zarr",)
    tiny = {"d_model": 32, "d_ff": 64, "n_layers": 1, "n_heads": 2, "synthetic_episodes": 6, "train_steps": 2,
            "diffusion_steps": 5, "batch_size": 32, "epochs": 2, "max_steps_per_epoch": 6}
    demo_jobs = (DemoJob("ebt", ("epochs=3", "max_steps_per_epoch=40", "synthetic_episodes=30", "d_model=64",
                                 "d_ff=128", "n_layers=2", "batch_size=128")),)
    max_body_bytes = 64 * 1024
    # requests planned as batches of up to 32 histories (the service's max_batch_items): 64 in flight are two
    # batches, about 0.6 s of the full-size model (d_model 192) on one core, well inside the 30 s timeout
    max_in_flight = 64

    def load_data(self, cfg: RobotPolicyConfig) -> DataBundle:
        from .data import (
            RobotPolicyState,
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
        state = RobotPolicyState(data=demos.name, fingerprint=demos.fingerprint,
                                 episodes={"train": tuple(ids[0]), "val": tuple(ids[1]), "test": tuple(ids[2])},
                                 **fit_normalizer(demos, parts[0]))
        datasets = [WindowDataset(demos, p, cfg.obs_horizon, cfg.action_horizon, cfg.action_exec) for p in parts]
        return DataBundle(train=datasets[0], val=datasets[1], test=datasets[2], state=state)

    def build_model(self, cfg: RobotPolicyConfig, state: RobotPolicyState) -> torch.nn.Module:
        from .model import build

        return build(cfg, state)

    def supports_ddp(self, cfg: RobotPolicyConfig) -> bool:
        return cfg.model != "ebt"  # EBT trains through its own gradient (double backward)

    def eval_signature(self, cfg: RobotPolicyConfig, state: RobotPolicyState) -> str:
        return (f"{state.fingerprint}:val{sorted(state.episodes['val'])}:To{cfg.obs_horizon}"
                f":Ta{cfg.action_horizon}")

    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        from .training import policy_loss

        return policy_loss(model, batch, device)

    def metric_sums(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        from .training import metric_sums

        return metric_sums(model, batches, device)

    def metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        from .training import metrics_from

        return metrics_from(sums)

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        from .plots import chunk_figure

        return {"chunks_vs_demonstrations.png": chunk_figure(model, data.test)}

    def evaluation(self, model: torch.nn.Module, cfg: RobotPolicyConfig, state: RobotPolicyState, data: str | None,
                   settings: RobotPolicyEvalConfig) -> EvaluationResult:
        from .evaluation import evaluate_policy

        return evaluate_policy(model, cfg, state, data, settings)

    def describe(self, cfg: RobotPolicyConfig, state: RobotPolicyState) -> dict[str, Any]:
        from .config import STATE_LAYOUT, WORKSPACE

        ebt = cfg.model == "ebt"
        return {"obs_horizon": cfg.obs_horizon, "action_horizon": cfg.action_horizon, "action_exec": cfg.action_exec,
                "infer_steps": cfg.infer_steps if ebt else None, "candidates": cfg.candidates if ebt else None,
                "state_layout": list(STATE_LAYOUT), "workspace": list(WORKSPACE), "data": state.data}

    def pyfunc_example(self, loaded: Any) -> tuple[Any, dict[str, Any]]:
        from .inference import pyfunc_example

        return pyfunc_example(loaded)

    def pyfunc_predict(self, loaded: Any, model_input: Any, params: dict[str, Any]) -> Any:
        from .inference import pyfunc_predict

        return pyfunc_predict(loaded, model_input, params)

    def example_request(self) -> dict[str, Any]:
        from .client import example_request

        return example_request()

    def predict(self, url: str, path: Path, *, horizon: int | None = None, output: Path | None = None,
                timeout: float = 120.0) -> Prediction:
        from .client import predict_json

        return predict_json(f"{url.rstrip('/')}{self.endpoint}", path, output=output, timeout=timeout)
