"""The weather domain: WXFormer on gridded xarray data (netCDF, zarr, GRIB), rolled out autoregressively."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import apply_overrides
from shared.registry import DataBundle, Domain, EvaluationResult, register

from .config import MODELS, WeatherConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

EVAL_SETTINGS: dict[str, Any] = {
    "lead_steps": 4,  # rollout length in model steps (4 x 6 h = 24 h by default)
    "init_every_hours": 6,  # initial times in the test period are taken this often
    "split": "test",  # period evaluated: test or val
    "map_lead": 1,  # lead (in steps) of the truth / forecast / error maps
}


@register
class Weather(Domain):
    name = "weather"
    models = MODELS
    port = 3002
    endpoint = "/forecast"
    service = "services.weather.service:Weather"
    config_cls = WeatherConfig
    val_metric = "wrmse"
    eval_settings = EVAL_SETTINGS

    def make_config(self, model: str | None = None, data: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> WeatherConfig:
        overrides = dict(overrides or {})
        model = model or overrides.pop("model", None) or MODELS[0]
        cfg = WeatherConfig(model=str(model), data=str(Path(data).resolve()) if data else None)
        return apply_overrides(cfg, overrides)

    def load_data(self, cfg: WeatherConfig) -> DataBundle:
        from .data import prepare

        prepared = prepare(cfg)
        return DataBundle(train=prepared.datasets[0], val=prepared.datasets[1], test=prepared.datasets[2],
                          info=prepared.info)

    def build_model(self, cfg: WeatherConfig, info: Mapping[str, Any]) -> torch.nn.Module:
        from .model import build

        return build(cfg, info)

    def eval_signature(self, cfg: WeatherConfig, info: Mapping[str, Any]) -> str:
        return (f"{info['fingerprint']}:{','.join(info['channels'])}:dt{cfg.step_hours}h:K{cfg.train_rollout}"
                f":val{info['periods']['val']}")

    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        from .training import rollout_loss

        return rollout_loss(model, batch, device)

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        from .training import offline_metrics

        return offline_metrics(model, batches, device)

    def calibrate(self, model: torch.nn.Module, val_batches: Any, info: dict[str, Any], cfg: WeatherConfig,
                  device: torch.device) -> dict[str, float]:
        """Damping and climatology-relaxation factors per rollout step and channel, fitted on validation."""
        if not (cfg.damping or cfg.relaxation) or len(val_batches) == 0:
            return {}
        from .training import fit_calibration

        damping, relaxation = fit_calibration(model, val_batches, device, cfg.train_rollout,
                                              damping=cfg.damping, relaxation=cfg.relaxation)
        info["damping"] = damping.cpu().tolist()
        out = {f"damping_step{k + 1}": float(row.mean()) for k, row in enumerate(damping)}
        if len(getattr(model, "relaxation", ())):
            info["relaxation"] = relaxation.cpu().tolist()
            out.update({f"relaxation_step{k + 1}": float(row.mean()) for k, row in enumerate(relaxation)})
        return out

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        from .plots import sample_figure

        return {"forecast_vs_truth.png": sample_figure(model, data.test, data.info)}

    def evaluation(self, model: torch.nn.Module, cfg: Any, info: Mapping[str, Any], data: str | None,
                   settings: Mapping[str, Any]) -> EvaluationResult:
        from .evaluation import evaluate_forecasts

        return evaluate_forecasts(model, cfg, info, data, settings)
