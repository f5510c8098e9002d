"""The weather domain: WXFormer on gridded xarray data (netCDF, zarr, GRIB), rolled out autoregressively."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from shared.registry import Calibration, DataBundle, DemoJob, Domain, EvaluationResult, Prediction, register

from .config import MODELS, WeatherConfig, WeatherEvalConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .data import WeatherState


@register
class WeatherDomain(Domain):
    name = "weather"
    models = MODELS
    port = 3002
    endpoint = "/forecast"
    service = "services.weather.service:Weather"
    config_cls = WeatherConfig
    saved_state = "services.weather.data:WeatherState"
    eval_config_cls = WeatherEvalConfig
    val_metric = "wrmse"
    requires = ("xarray", "netCDF4", "scipy", "cfgrib")
    data_suffixes = (".grib", ".grb", ".grib2", ".nc")
    # the default synthetic grid and one input state (as the demo's model), so that the one-state example request
    # (and the JSON endpoint, which takes one state) fits both
    tiny = {"dims": (16, 32), "depths": (1, 1), "kernels": ((2, 4), (2, 4)), "strides": (2, 2), "local_window": 2,
            "global_windows": (2, 2), "dim_head": 8, "synthetic_days": 6, "batch_size": 4, "epochs": 2,
            "max_steps_per_epoch": 4, "history": 1, "residual_base": "last", "train_rollout": 2}
    demo_jobs = (DemoJob("wxformer", ("epochs=2", "max_steps_per_epoch=30", "synthetic_days=20", "history=1",
                                     "residual_base=last", "train_rollout=2")),)
    max_body_bytes = 32 * 1024 * 1024
    max_in_flight = 8

    def load_data(self, cfg: WeatherConfig) -> DataBundle:
        from .data import prepare

        prepared = prepare(cfg)
        return DataBundle(train=prepared.datasets[0], val=prepared.datasets[1], test=prepared.datasets[2],
                          state=prepared.state)

    def build_model(self, cfg: WeatherConfig, state: WeatherState) -> torch.nn.Module:
        from .model import build

        return build(cfg, state)

    def eval_signature(self, cfg: WeatherConfig, state: WeatherState) -> str:
        return (f"{state.fingerprint}:{','.join(state.channels)}:dt{cfg.step_hours}h:K{cfg.train_rollout}"
                f":val{list(state.periods['val'])}")

    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        from .training import rollout_loss

        return rollout_loss(model, batch, device)

    def metric_sums(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        from .training import metric_sums

        return metric_sums(model, batches, device)

    def metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        from .training import metrics_from

        return metrics_from(sums)

    def calibrate(self, model: torch.nn.Module, val_batches: Any, state: WeatherState, cfg: WeatherConfig,
                  device: torch.device) -> Calibration | None:
        """Damping and climatology-relaxation factors per rollout step and channel, fitted on validation."""
        if not (cfg.damping or cfg.relaxation) or len(val_batches) == 0:
            return None
        import dataclasses

        import torch.utils.data

        from .data import RolloutDataset
        from .training import CALIBRATION_WINDOWS, fit_calibration

        steps, longer = cfg.train_rollout, None
        dataset = getattr(val_batches, "dataset", None)
        extended = None
        if isinstance(dataset, RolloutDataset):
            extended = dataset.longest(cfg.calibration_steps, CALIBRATION_WINDOWS)
        if extended is not None:  # the steps past the training rollout, on the windows that reach them
            steps = extended.rollout
            longer = torch.utils.data.DataLoader(extended, batch_size=val_batches.batch_size)
        damping, relaxation = fit_calibration(model, val_batches, device, steps, damping=cfg.damping,
                                              relaxation=cfg.relaxation, longer=longer)
        metrics = {f"damping_step{k + 1}": float(row.mean()) for k, row in enumerate(damping)}
        relaxed = len(getattr(model, "relaxation", ())) > 0
        if relaxed:
            metrics.update({f"relaxation_step{k + 1}": float(row.mean()) for k, row in enumerate(relaxation)})
        fitted = dataclasses.replace(state, damping=damping.cpu(),
                                     relaxation=relaxation.cpu() if relaxed else state.relaxation,
                                     relaxation_keeps_mean=bool(getattr(model, "keep_mean", False)) if relaxed
                                     else state.relaxation_keeps_mean)
        return Calibration(state=fitted, metrics=metrics)

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        from .plots import sample_figure

        return {"forecast_vs_truth.png": sample_figure(model, data.test, cast("WeatherState", data.state))}

    def evaluation(self, model: torch.nn.Module, cfg: Any, state: WeatherState, data: str | None,
                   settings: WeatherEvalConfig) -> EvaluationResult:
        from .evaluation import evaluate_forecasts

        return evaluate_forecasts(model, cfg, state, data, settings)

    def describe(self, cfg: WeatherConfig, state: WeatherState) -> dict[str, Any]:
        grid = state.grid
        axes = ({"latitude": grid.lat[:, 0].tolist(), "longitude": grid.lon[0].tolist(), "regular": True}
                if grid.regular else {"latitude": grid.lat.tolist(), "longitude": grid.lon.tolist(), "regular": False})
        return {"channels": list(state.channels), "units": dict(zip(state.channels, state.units, strict=True)),
                "variables": [{"variable": v, "level": lv} for v, lv in state.sources],
                "step_hours": state.step_hours, "history": cfg.history, "grid": axes, "data": state.data,
                "periods": {k: list(v) for k, v in state.periods.items()}}

    def pyfunc_example(self, loaded: Any) -> tuple[Any, dict[str, Any]]:
        from .inference import pyfunc_example

        return pyfunc_example(loaded)

    def pyfunc_predict(self, loaded: Any, model_input: Any, params: dict[str, Any]) -> Any:
        from .inference import pyfunc_predict

        return pyfunc_predict(loaded, model_input, params)

    # the JSON form: the netCDF upload of `endpoint` has no JSON body
    example_route = "/forecast_json"

    def example_request(self) -> dict[str, Any]:
        from .client import example_request

        return example_request()

    def example_input(self, folder: Path, data: str | None = None) -> Path:
        from .client import example_netcdf

        return example_netcdf(folder, data)

    def predict(self, url: str, path: Path, *, horizon: int | None = None, output: Path | None = None,
                timeout: float = 600.0) -> Prediction:
        from .client import predict_netcdf

        return predict_netcdf(f"{url.rstrip('/')}{self.endpoint}", path, steps=horizon or 4,
                              output=output or Path("forecast.nc"), timeout=timeout)
