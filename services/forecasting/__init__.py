"""The forecasting domain: iTransformer and Autoformer on multivariate time series."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import apply_overrides
from shared.registry import DataBundle, DemoJob, Domain, Prediction, register

from .config import MODELS, ForecastingConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .data import ForecastingState


@register
class ForecastingDomain(Domain):
    name = "forecasting"
    models = MODELS
    port = 3001
    endpoint = "/forecast"
    service = "services.forecasting.service:Forecasting"
    config_cls = ForecastingConfig
    saved_state = "services.forecasting.data:ForecastingState"
    val_metric = "mse"
    requires = ("pandas", "pyarrow")
    data_suffixes = (".csv", ".parquet")
    # the synthetic series' 7 variables, as the demo's models (so that the example request fits both)
    tiny = {"d_model": 16, "d_ff": 32, "e_layers": 1, "d_layers": 1, "n_heads": 2, "seq_len": 48, "label_len": 24,
            "pred_len": 24, "synthetic_steps": 1500, "batch_size": 16, "epochs": 2, "max_steps_per_epoch": 8}
    demo_jobs = (DemoJob("itransformer", ("epochs=3", "max_steps_per_epoch=120")),
                 DemoJob("autoformer", ("epochs=2", "max_steps_per_epoch=60", "d_model=128", "d_ff=256")))
    max_body_bytes = 8 * 1024 * 1024

    def make_config(self, model: str | None = None, data: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> ForecastingConfig:
        from shared import datapath

        overrides = dict(overrides or {})
        model = model or overrides.pop("model", None) or MODELS[0]
        pred_len = int(overrides.get("pred_len", 96))
        cfg = ForecastingConfig.published(str(model), pred_len=pred_len,
                                          data=datapath.normalize(data) if data else None)
        return apply_overrides(cfg, overrides)

    def load_data(self, cfg: ForecastingConfig) -> DataBundle:
        from .data import WindowDataset, load_frame, prepare
        from .streaming import in_memory_mb, prepare_streamed

        if cfg.data is not None and in_memory_mb(cfg.data) > cfg.max_in_memory_mb:
            prepared = prepare_streamed(cfg.data, seq_len=cfg.seq_len, pred_len=cfg.pred_len, split=cfg.split,
                                        time_features=cfg.time_features)
        else:
            frame, name, fingerprint = load_frame(cfg.data, synthetic_steps=cfg.synthetic_steps,
                                                  synthetic_vars=cfg.synthetic_vars, seed=cfg.seed)
            prepared = prepare(frame, seq_len=cfg.seq_len, pred_len=cfg.pred_len, split=cfg.split, name=name,
                               time_features=cfg.time_features, fingerprint=fingerprint)
        splits = [WindowDataset(prepared.values[a:b], prepared.marks[a:b], cfg.seq_len, cfg.label_len, cfg.pred_len)
                  for a, b in prepared.borders]
        return DataBundle(train=splits[0], val=splits[1], test=splits[2], state=prepared.state)

    def build_model(self, cfg: ForecastingConfig, state: ForecastingState) -> torch.nn.Module:
        n_vars, n_marks = len(state.columns), len(state.marks)
        if cfg.model == "autoformer":
            from .model_autoformer import Autoformer

            return Autoformer(cfg, n_vars, n_marks)
        from .model_itransformer import ITransformer

        return ITransformer(cfg, n_vars, n_marks)

    def eval_signature(self, cfg: ForecastingConfig, state: ForecastingState) -> str:
        return f"{state.fingerprint}:{state.split}:L{cfg.seq_len}:H{cfg.pred_len}"

    @staticmethod
    def _forward(model: torch.nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        from .inference import INFERER

        x, y, x_mark, y_mark = (t.to(device, non_blocking=True) for t in batch)
        if x_mark.shape[-1] == 0:
            x_mark = y_mark = None
        return INFERER(model, x, x_mark, y_mark), y

    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        import torch.nn.functional as F

        pred, y = self._forward(model, batch, device)
        return F.mse_loss(pred.float(), y)

    def metric_sums(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        from .metrics import ErrorAccumulator

        acc = ErrorAccumulator()
        for batch in batches:
            pred, y = self._forward(model, batch, device)
            acc.update(pred, y)
        return acc.sums()

    def metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        from .metrics import ErrorAccumulator

        return ErrorAccumulator.compute(sums)

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        from .plots import forecast_figure

        return {"forecast_vs_truth.png": forecast_figure(model, data, cfg)}

    def describe(self, cfg: ForecastingConfig, state: ForecastingState) -> dict[str, Any]:
        return {"columns": list(state.columns), "seq_len": cfg.seq_len, "label_len": cfg.label_len,
                "pred_len": cfg.pred_len, "marks": list(state.marks), "step_seconds": state.step_seconds,
                "dataset": state.dataset}

    def pyfunc_example(self, loaded: Any) -> tuple[Any, dict[str, Any]]:
        from .inference import pyfunc_example

        return pyfunc_example(loaded, self._meta(loaded))

    def pyfunc_predict(self, loaded: Any, model_input: Any, params: dict[str, Any]) -> Any:
        from .inference import pyfunc_predict

        return pyfunc_predict(loaded, self._meta(loaded), model_input, params)

    def _meta(self, loaded: Any) -> dict[str, Any]:
        return {**loaded.describe(), **self.describe(loaded.cfg, loaded.state)}

    def example_request(self) -> dict[str, Any]:
        from .client import example_request

        return example_request()

    def example_input(self, folder: Path, data: str | None = None) -> Path:
        from .client import example_csv

        return example_csv(folder, data)

    def predict(self, url: str, path: Path, *, horizon: int | None = None, output: Path | None = None,
                timeout: float = 120.0) -> Prediction:
        from .client import predict_csv

        return predict_csv(f"{url.rstrip('/')}{self.endpoint}", path, horizon=horizon, output=output,
                           timeout=timeout)
