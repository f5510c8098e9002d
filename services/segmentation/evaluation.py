"""The segmentation evaluation: Dice and HD95 per region and case, on each case's own grid (MONAI metrics).

Without ``--data`` the model is scored on its own test cases; with ``--data`` on every labelled case of that
folder (an external test set in the MSD or a BraTS layout). Each prediction is brought back to the case's grid
first (as served), so the figures are in the input's voxels and millimetres.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.registry import EvaluationResult

from .config import SegmentationConfig, SegmentationEvalConfig
from .data import Case, SegmentationState, load_nifti, read_collection, synthetic_collection
from .inference import check_inputs, predict_classes


def region_scores(pred: np.ndarray, truth: np.ndarray, regions: dict[str, tuple[int, ...]],
                  spacing: tuple[float, ...], percentile: float = 95.0) -> dict[str, dict[str, float]]:
    """Dice and the percentile Hausdorff distance (mm) of each region (label values united) for one case;
    NaN where the truth has no voxel of the region (Dice) or either mask is empty (HD). The masks and the Dice
    are validation's (``training.region_masks``, ``training.mask_dice``)."""
    from monai.metrics import compute_hausdorff_distance

    from .training import mask_dice, region_masks

    dice, hd = {}, {}
    for name, values in regions.items():
        p, t = region_masks(torch.from_numpy(pred), torch.from_numpy(truth), values)
        dice[name] = mask_dice(p, t)
        if p.sum() == 0 or t.sum() == 0:
            hd[name] = math.nan
        else:
            hd[name] = float(compute_hausdorff_distance(p, t, include_background=True, percentile=percentile,
                                                        spacing=list(spacing))[0, 0])
    return {"dice": dice, "hd95": hd}


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 5) if finite else None


def _json(value: float) -> float | None:
    return round(value, 5) if math.isfinite(value) else None


def evaluation_cases(cfg: SegmentationConfig, state: SegmentationState, data: str | None) -> tuple[list[Case], str]:
    if data:
        return [c for c in read_collection(data).cases if c.label is not None], "external"
    from shared.datapath import cache_dir

    collection = (read_collection(cfg.data, cfg.layout) if cfg.data
                  else synthetic_collection(cfg, cache_dir("segmentation")))
    wanted = set(state.cases["test"])
    return [c for c in collection.cases if c.case_id in wanted], "test"


def evaluate_segmentation(model: nn.Module, cfg: SegmentationConfig, state: SegmentationState, data: str | None,
                          settings: SegmentationEvalConfig) -> EvaluationResult:
    from rich.progress import track

    from .plots import slices_figure

    cases, split = evaluation_cases(cfg, state, data)
    if not cases:
        raise ValueError("no labelled case to score")
    model = model.eval()
    per_case: list[dict[str, Any]] = []
    rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    values = np.asarray(state.label_values, dtype=np.int64)
    lookup = np.zeros(int(max(state.label_values)) + 1, dtype=np.int64)  # label value -> class index
    lookup[values] = np.arange(len(values))

    def to_classes(mask: np.ndarray) -> np.ndarray:
        return lookup[np.clip(mask, 0, len(lookup) - 1)]

    for case in track(cases, description=f"segmenting {len(cases)} {split} case(s)"):
        inputs = check_inputs([Path(p) for p in case.images], state.channels)
        pred = values[predict_classes(model, state, inputs)]
        truth_image = load_nifti(str(case.label))
        truth = np.rint(np.asarray(truth_image.dataobj)).astype(np.int64)
        spacing = tuple(float(z) for z in truth_image.header.get_zooms()[:3])
        found = region_scores(pred, truth, state.regions, spacing, settings.hd_percentile)
        per_case.append({"case_id": case.case_id, "dice": {k: _json(v) for k, v in found["dice"].items()},
                         "hd95": {k: _json(v) for k, v in found["hd95"].items()}})
        if len(rows) < settings.figure_cases:
            image = np.asarray(load_nifti(case.images[0]).dataobj, dtype=np.float32)
            image = image[..., 0] if image.ndim == 4 else image
            rows.append((case.case_id, image, to_classes(truth), to_classes(pred)))
    regions = list(state.regions)
    metrics: dict[str, Any] = {
        "dice": {r: _mean([c["dice"][r] if c["dice"][r] is not None else math.nan for c in per_case]) for r in regions},
        "hd95": {r: _mean([c["hd95"][r] if c["hd95"][r] is not None else math.nan for c in per_case]) for r in regions},
        "per_case": per_case, "n_cases": len(per_case), "split": split}
    dice_means = [v for v in metrics["dice"].values() if v is not None]
    metrics["mean_dice"] = round(float(np.mean(dice_means)), 5) if dice_means else None
    figures = {"slices.png": slices_figure(rows)} if rows else {}
    return EvaluationResult(metrics=metrics, figures=figures)
