"""The transients domain: calibrated classes of astronomical transients from multi-band light curves.

Models: ``native`` (a token per observation, packed batches; the default) and ``t2`` (Allam & McEwen 2023: a
Gaussian-process grid into a transformer). Data: the PLAsTiCC layout (light curves + metadata), which the ZTF
Bright Transient Survey set in ``../shared/data/transients`` also uses; synthetic light curves otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.registry import Calibration, DataBundle, DemoJob, Domain, EvaluationResult, Prediction, register

from .config import MODELS, TransientsConfig, TransientsEvalConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .data import TransientsState


@register
class TransientsDomain(Domain):
    name = "transients"
    models = MODELS
    port = 3003
    endpoint = "/classify"
    service = "services.transients.service:Transients"
    config_cls = TransientsConfig
    saved_state = "services.transients.data:TransientsState"
    eval_config_cls = TransientsEvalConfig
    val_metric = "log_loss"
    requires = ("pandas", "pyarrow", "sklearn", "lightgbm", "light_curve")
    data_suffixes = (".csv", ".parquet")
    tiny = {"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2, "synthetic_objects": 120, "epochs": 2,
            "max_steps_per_epoch": 4, "batch_size": 16, "gp_steps": 20}
    demo_jobs = (DemoJob("native", ("epochs=8", "synthetic_objects=600")),)
    max_body_bytes = 4 * 1024 * 1024

    def data_match(self, path: str) -> int:
        """A table with a metadata file beside it is a light-curve set (2); a table alone is not ours (0)."""
        from .data import find_metadata

        return 2 if super().data_match(path) and find_metadata(path) is not None else 0

    def load_data(self, cfg: TransientsConfig) -> DataBundle:
        import numpy as np

        from .data import (
            CurveDataset,
            GridDataset,
            LabelledCurves,
            ReadReport,
            TransientsState,
            band_info,
            load_labelled,
            object_globals,
            split_objects,
            synthetic_curves,
        )

        if cfg.data:
            labelled = load_labelled(cfg.data, cfg.metadata, cfg)
            for line in labelled.report.lines():
                print(f"transients data: {line}", flush=True)
        else:
            curves, labels, classes = synthetic_curves(cfg.synthetic_objects, seed=cfg.seed)
            labelled = LabelledCurves(curves, labels, classes, "ztf", "synthetic",
                                      f"synthetic:{cfg.synthetic_objects}:{cfg.seed}", ReadReport(kept=len(curves)))
        parts = split_objects(labelled.labels, cfg.val_fraction, cfg.seed)
        bands, wavelengths = band_info(labelled.survey)
        counts = np.bincount(labelled.labels[parts[0]], minlength=len(labelled.classes))
        state = TransientsState(
            data=labelled.name, fingerprint=labelled.fingerprint, classes=tuple(labelled.classes),
            survey=labelled.survey, bands=bands, wavelengths=wavelengths,
            objects={k: tuple(labelled.curves[i].object_id for i in p)
                     for k, p in zip(("train", "val", "test"), parts, strict=True)},
            class_counts=tuple(int(n) for n in counts))
        if cfg.model == "t2":
            from .gp import gp_grids

            grids = gp_grids(labelled.curves, wavelengths, steps=cfg.gp_steps, window_days=cfg.window_days,
                             wavelength_scale=cfg.gp_wavelength_scale, progress=True)
            globals_ = np.stack([object_globals(c, cfg.use_redshift) for c in labelled.curves])
            datasets: list[Any] = [GridDataset(grids[p], globals_[p], labelled.labels[p]) for p in parts]
        else:
            datasets = [CurveDataset([labelled.curves[i] for i in p], labelled.labels[p], cfg, train=k == 0,
                                     n_bands=len(bands), wavelengths=wavelengths) for k, p in enumerate(parts)]
        return DataBundle(train=datasets[0], val=datasets[1], test=datasets[2], state=state)

    def build_model(self, cfg: TransientsConfig, state: TransientsState) -> torch.nn.Module:
        from .model import build

        return build(cfg, state)

    def pretraining(self, cfg: TransientsConfig, state: TransientsState) -> TransientsConfig | None:
        """The native network on data first learns on ``pretrain_objects`` synthetic light curves (the offline
        default's generator: ZTF g and r, the same five classes) for ``pretrain_epochs``, with this run's other
        settings; None for t2, for synthetic data itself and for data of other bands than ZTF's."""
        if cfg.model != "native" or not cfg.data or not cfg.pretrain_objects:
            return None
        from .data import SYNTHETIC_CLASSES

        if state.survey != "ztf" or list(state.classes) != list(SYNTHETIC_CLASSES):
            print(f"transients: no pretraining on synthetic light curves: they have ZTF's g and r and the classes "
                  f"{list(SYNTHETIC_CLASSES)}, the data {list(state.bands)} and {list(state.classes)}", flush=True)
            return None
        return dataclasses.replace(cfg, data=None, metadata=None, synthetic_objects=cfg.pretrain_objects,
                                   epochs=cfg.pretrain_epochs, patience=cfg.pretrain_epochs)

    def collate(self, cfg: TransientsConfig) -> Callable[[list[Any]], Any] | None:
        from .data import collate_grids, collate_packed, collate_padded

        if cfg.model == "t2":
            return collate_grids
        return collate_packed if cfg.packing == "pack" else collate_padded

    def eval_signature(self, cfg: TransientsConfig, state: TransientsState) -> str:
        import hashlib

        val = hashlib.sha256("\n".join(state.objects["val"]).encode()).hexdigest()[:12]
        return f"{state.fingerprint}:classes{list(state.classes)}:val{val}:z{int(cfg.use_redshift)}"

    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        from .training import class_loss

        return class_loss(model, batch, device)

    def metric_sums(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        from .training import metric_sums

        return metric_sums(model, batches, device)

    def metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        from .training import metrics_from

        return metrics_from(sums)

    def calibrate(self, model: torch.nn.Module, val_batches: Any, state: TransientsState, cfg: TransientsConfig,
                  device: torch.device) -> Calibration | None:
        """Temperature scaling on validation, and the OOD threshold (95 % of validation objects below it)."""
        from .training import calibrate

        temperature, threshold, metrics = calibrate(model, val_batches, device)
        return Calibration(state=dataclasses.replace(state, temperature=temperature, ood_threshold=threshold),
                           metrics=metrics)

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        import numpy as np
        from torch.utils.data import DataLoader

        from .metrics import confusion_figure, reliability_figure
        from .training import logits_and_labels

        loader: DataLoader[Any] = DataLoader(data.test, batch_size=256, collate_fn=self.collate(cfg))  # type: ignore[arg-type]
        logits, labels = logits_and_labels(model, loader, next(model.parameters()).device)
        if not len(labels):
            return {}
        proba = logits.softmax(-1).numpy()
        classes = list(data.state.classes)  # type: ignore[attr-defined]
        from .training import decide

        pred = decide(model, logits).numpy()
        return {"confusion_test.png": confusion_figure(np.asarray(labels), proba, classes, pred),
                "reliability_test.png": reliability_figure(np.asarray(labels), proba, title="test (calibrated)")}

    def evaluation(self, model: torch.nn.Module, cfg: TransientsConfig, state: TransientsState, data: str | None,
                   settings: TransientsEvalConfig) -> EvaluationResult:
        from .evaluation import evaluate_classifier

        return evaluate_classifier(model, cfg, state, data, settings)

    def describe(self, cfg: TransientsConfig, state: TransientsState) -> dict[str, Any]:
        from .inference import MAX_OBJECTS
        from .model import decision_bias

        return {"classes": list(state.classes), "bands": list(state.bands), "survey": state.survey,
                "uses_redshift": cfg.use_redshift, "temperature": state.temperature,
                "decision": cfg.decision, "decision_bias": decision_bias(cfg, state),
                "ood_threshold": state.ood_threshold, "max_points": cfg.max_points, "max_objects": MAX_OBJECTS,
                "data": state.data}

    def pyfunc_example(self, loaded: Any) -> tuple[Any, dict[str, Any]]:
        from .inference import pyfunc_example

        return pyfunc_example(loaded)

    def pyfunc_predict(self, loaded: Any, model_input: Any, params: dict[str, Any]) -> Any:
        from .inference import pyfunc_predict

        return pyfunc_predict(loaded, model_input, params)

    def example_request(self) -> dict[str, Any]:
        from .client import example_request

        return example_request()

    def example_input(self, folder: Path, data: str | None = None) -> Path:
        from .client import example_input

        return example_input(folder, data)

    def predict(self, url: str, path: Path, *, horizon: int | None = None, output: Path | None = None,
                timeout: float = 120.0) -> Prediction:
        from .client import predict_file

        return predict_file(f"{url.rstrip('/')}{self.endpoint}", path, output=output, timeout=timeout)
