"""The segmentation domain: 3-D medical image segmentation with a transformer U-Net of reversible blocks.

Data: folders in the MSD layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``) or the BraTS layouts (2015 as
prepared for DeepMedic; 2020/2021 naming), NIfTI through MONAI; synthetic volumes in the MSD layout otherwise.
Training on random patches (MONAI transforms, Dice + cross-entropy), validation and serving over sliding
windows; predictions go back to the input's own grid, affine and header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.registry import DataBundle, DemoJob, Domain, EvaluationResult, Prediction, register

from .config import MODELS, SegmentationConfig, SegmentationEvalConfig

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .data import SegmentationState


@register
class SegmentationDomain(Domain):
    name = "segmentation"
    models = MODELS
    port = 3004
    endpoint = "/segment"
    example_route = "/segment_json"
    service = "services.segmentation.service:Segmentation"
    config_cls = SegmentationConfig
    saved_state = "services.segmentation.data:SegmentationState"
    eval_config_cls = SegmentationEvalConfig
    val_metric = "dice_loss"
    requires = ("monai", "nibabel", "einops")
    tiny = {"channels": 4, "expansion": 1, "depth": 1, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32,
            "synthetic_cases": 8, "val_fraction": 0.25, "synthetic_shape": (24, 24, 24), "patch": (16, 16, 16),
            "epochs": 2, "max_steps_per_epoch": 3, "batch_size": 2, "samples_per_case": 1, "sw_batch_size": 2}
    demo_jobs = (DemoJob("revunet", ("epochs=4", "synthetic_cases=16", "channels=8", "expansion=2",
                                     "synthetic_shape=32,32,32", "patch=32,32,32", "d_model=32", "n_layers=2",
                                     "d_ff=64")),)
    max_body_bytes = 256 * 1024 * 1024
    max_in_flight = 4

    def data_match(self, path: str) -> int:
        """A folder in the MSD or a BraTS layout (2); anything else is not ours (0)."""
        from .data import LayoutError, detect_layout

        root = Path(path)
        if not root.is_dir():
            return 0
        try:
            detect_layout(root)
        except LayoutError:
            return 0
        return 2

    def load_data(self, cfg: SegmentationConfig) -> DataBundle:
        from shared.datapath import cache_dir

        from .data import (
            SegmentationState,
            VolumeDataset,
            augmentation,
            auto_patch,
            case_repeats,
            fingerprint,
            read_collection,
            regions_for,
            split_cases,
            synthetic_collection,
        )

        collection = (read_collection(cfg.data, cfg.layout) if cfg.data
                      else synthetic_collection(cfg, cache_dir("segmentation")))
        cases = [c for c in collection.cases if c.label is not None]
        if cfg.max_cases:
            cases = cases[:cfg.max_cases]
        labels = dict(zip(collection.label_values, collection.label_names, strict=True))
        print(f"segmentation data: {collection.name} ({collection.layout}): {len(cases)} labelled case(s), "
              f"channels {list(collection.channels)}, labels {labels}", flush=True)
        for note in collection.notes:
            print(f"segmentation data: {note}", flush=True)
        parts = split_cases(len(cases), cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.folds, cfg.fold)
        chosen = [[cases[i] for i in p] for p in parts]
        state = SegmentationState(
            data=collection.name, fingerprint=fingerprint(cases), layout=collection.layout,
            channels=collection.channels, label_values=collection.label_values, label_names=collection.label_names,
            regions=regions_for(collection, cfg.regions), spacing=tuple(float(s) for s in cfg.spacing),
            patch=auto_patch(chosen[0], cfg),
            cases={k: tuple(c.case_id for c in p) for k, p in zip(("train", "val", "test"), chosen, strict=True)})
        train = VolumeDataset(chosen[0], state, augment=augmentation(state, cfg),
                              repeats=case_repeats(len(chosen[0]), cfg))
        return DataBundle(train=train, val=VolumeDataset(chosen[1], state), test=VolumeDataset(chosen[2], state),
                          state=state)

    def build_model(self, cfg: SegmentationConfig, state: SegmentationState) -> torch.nn.Module:
        from .model import build
        from .training import region_classes

        model = build(cfg, len(state.channels), len(state.label_values), tuple(state.patch))
        model.region_classes = region_classes(state.regions, state.label_values)  # validation scores regions
        return model

    def collate(self, cfg: SegmentationConfig) -> Callable[[list[Any]], Any] | None:
        from .data import collate

        return collate

    def eval_signature(self, cfg: SegmentationConfig, state: SegmentationState) -> str:
        import hashlib

        val = hashlib.sha256("\n".join(state.cases["val"]).encode()).hexdigest()[:12]
        return f"{state.fingerprint}:labels{list(state.label_values)}:val{val}"

    def training_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        from .training import segmentation_loss

        return segmentation_loss(model, batch, device)

    def metric_sums(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device) -> dict[str, float]:
        from .training import metric_sums

        return metric_sums(model, batches, device)

    def metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        from .training import metrics_from

        return metrics_from(sums)

    def figures(self, model: torch.nn.Module, data: DataBundle, cfg: Any) -> dict[str, Figure]:
        from .plots import slices_figure

        test = data.test
        rows = []
        for i in range(min(3, len(test))):
            item = test.volume(i)  # type: ignore[attr-defined]
            probabilities = model.segment(item["image"].as_tensor()[None].float())  # type: ignore[operator]
            rows.append((item["case_id"], item["image"].as_tensor()[0].numpy(), item["label"].as_tensor()[0].numpy(),
                         probabilities.argmax(1)[0].numpy()))
        return {"slices_test.png": slices_figure(rows)} if rows else {}

    def evaluation(self, model: torch.nn.Module, cfg: SegmentationConfig, state: SegmentationState,
                   data: str | None, settings: SegmentationEvalConfig) -> EvaluationResult:
        from .evaluation import evaluate_segmentation

        return evaluate_segmentation(model, cfg, state, data, settings)

    def describe(self, cfg: SegmentationConfig, state: SegmentationState) -> dict[str, Any]:
        from .inference import MAX_VOXELS

        return {"channels": list(state.channels), "labels": dict(zip([str(v) for v in state.label_values],
                                                                     state.label_names, strict=True)),
                "regions": {k: list(v) for k, v in state.regions.items()}, "spacing": list(state.spacing),
                "orientation": "RAS", "patch": list(state.patch), "memory": cfg.memory, "max_voxels": MAX_VOXELS,
                "data": state.data}

    def pyfunc_example(self, loaded: Any) -> tuple[Any, dict[str, Any]]:
        from .client import pyfunc_example

        return pyfunc_example(loaded)

    def pyfunc_predict(self, loaded: Any, model_input: Any, params: dict[str, Any]) -> Any:
        from .client import pyfunc_predict

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
