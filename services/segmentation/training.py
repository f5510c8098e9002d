"""Loss and additive validation statistics of the segmentation domain (MONAI's Dice + cross-entropy and Dice)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .data import Batch

_LOSS: Any = None


def _loss() -> Any:
    global _LOSS
    if _LOSS is None:
        from monai.losses import DiceCELoss

        _LOSS = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, batch=True)
    return _LOSS


def segmentation_loss(model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
    """Dice + cross-entropy (MONAI ``DiceCELoss``, the nnU-Net pairing) of a batch of stacked patches."""
    assert isinstance(batch.images, Tensor) and isinstance(batch.labels, Tensor), "training batches are patches"
    logits = model(batch.images.to(device))
    return _loss()(logits.float(), batch.labels.to(device))


def case_dice(probabilities: Tensor, label: Tensor, n_classes: int) -> Tensor:
    """Dice per foreground class (K-1,) of one case (MONAI ``DiceMetric``); NaN where the truth has no voxel of
    the class (left out of the means, as MONAI's ``ignore_empty``)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    pred = one_hot(probabilities.argmax(1, keepdim=True), n_classes)
    truth = one_hot(label.long(), n_classes)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    result: Any = metric(pred, truth)
    return torch.as_tensor(result)[0]


def region_classes(regions: Mapping[str, Sequence[int]], label_values: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The evaluation regions (label values united) as the network's class indices."""
    index = {int(v): i for i, v in enumerate(label_values)}
    return {name: tuple(index[int(v)] for v in values if int(v) in index) for name, values in regions.items()}


def region_masks(pred: Tensor, truth: Tensor, members: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The predicted and true masks of one region (its values united; label values or class indices alike), as
    MONAI's metrics take them: float, (1, 1, *spatial)."""
    wanted = torch.as_tensor(tuple(members), dtype=torch.long)
    return (torch.isin(pred.long(), wanted).float()[None, None], torch.isin(truth.long(), wanted).float()[None, None])


def mask_dice(pred: Tensor, truth: Tensor) -> float:
    """Dice of two masks from :func:`region_masks` (MONAI ``compute_dice``); NaN where the truth is empty
    (``ignore_empty``: left out of the means)."""
    from monai.metrics import compute_dice

    return float(compute_dice(pred, truth, include_background=True, ignore_empty=True)[0, 0])


def region_dice(pred: Tensor, truth: Tensor, regions: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Dice of each region of one case (see :func:`region_masks`, :func:`mask_dice`)."""
    return {name: mask_dice(*region_masks(pred, truth, members)) for name, members in regions.items()}


@torch.no_grad()
def metric_sums(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Per foreground class, and per evaluation region where the model carries them (``region_classes``: BraTS
    whole tumour, tumour core, enhancing; each label alone otherwise): the sum of per-case Dice and the number of
    cases it is defined on (whole volumes through the sliding windows), added over workers."""
    segment = getattr(model, "segment")  # noqa: B009 (DDP wraps the module: the attribute of the inner one)
    n_classes = int(getattr(model, "n_classes"))  # noqa: B009
    regions: Mapping[str, tuple[int, ...]] = getattr(model, "region_classes", None) or {}
    sums: dict[str, float] = {f"dice_sum_{k}": 0.0 for k in range(1, n_classes)}
    sums.update({f"dice_n_{k}": 0.0 for k in range(1, n_classes)})
    sums.update({f"region_sum_{r}": 0.0 for r in regions} | {f"region_n_{r}": 0.0 for r in regions})
    sums["cases"] = 0.0
    for batch in batches:
        for image, label in batch.volumes():
            probabilities = segment(image[None].to(device)).cpu()
            dice = case_dice(probabilities, label[None].cpu(), n_classes)
            for k in range(1, n_classes):
                value = float(dice[k - 1])
                if math.isfinite(value):
                    sums[f"dice_sum_{k}"] += value
                    sums[f"dice_n_{k}"] += 1.0
            if regions:
                found = region_dice(probabilities.argmax(1)[0], label[0].cpu(), regions)
                for name, value in found.items():
                    if math.isfinite(value):
                        sums[f"region_sum_{name}"] += value
                        sums[f"region_n_{name}"] += 1.0
            sums["cases"] += 1.0
    return sums


def metrics_from(sums: Mapping[str, float]) -> dict[str, float]:
    """Mean Dice per class (``dice_<k>``) and per region (``dice_<region>``); ``dice``, the mean over the
    regions where there are any (the figure the evaluation reports: for BraTS whole tumour, tumour core and
    enhancing, not its four labels), else over the classes; ``dice_loss`` = 1 - dice (the validation metric:
    lower is better)."""
    classes = sorted(int(k.rsplit("_", 1)[1]) for k in sums if k.startswith("dice_sum_"))
    per_class = {k: sums[f"dice_sum_{k}"] / sums[f"dice_n_{k}"] for k in classes if sums.get(f"dice_n_{k}", 0) > 0}
    names = [k[len("region_sum_"):] for k in sums if k.startswith("region_sum_")]
    per_region = {r: sums[f"region_sum_{r}"] / sums[f"region_n_{r}"] for r in names if sums.get(f"region_n_{r}", 0) > 0}
    chosen = per_region if names else per_class
    if not chosen:
        return {"dice": 0.0, "dice_loss": 1.0}
    mean = sum(chosen.values()) / len(chosen)
    return {**{f"dice_{k}": v for k, v in per_class.items()}, **{f"dice_{r}": v for r, v in per_region.items()},
            "dice": mean, "dice_loss": 1.0 - mean}
