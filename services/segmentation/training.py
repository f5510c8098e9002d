"""Loss and additive validation statistics of the segmentation domain (MONAI's Dice + cross-entropy and Dice)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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


@torch.no_grad()
def metric_sums(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Per foreground class: the sum of per-case Dice and the number of cases it is defined on (whole volumes
    through the sliding windows), added over workers."""
    segment = getattr(model, "segment")  # noqa: B009 (DDP wraps the module: the attribute of the inner one)
    n_classes = int(getattr(model, "n_classes"))  # noqa: B009
    sums: dict[str, float] = {f"dice_sum_{k}": 0.0 for k in range(1, n_classes)}
    sums.update({f"dice_n_{k}": 0.0 for k in range(1, n_classes)})
    sums["cases"] = 0.0
    for batch in batches:
        for image, label in batch.volumes():
            probabilities = segment(image[None].to(device))
            dice = case_dice(probabilities.cpu(), label[None].cpu(), n_classes)
            for k in range(1, n_classes):
                value = float(dice[k - 1])
                if math.isfinite(value):
                    sums[f"dice_sum_{k}"] += value
                    sums[f"dice_n_{k}"] += 1.0
            sums["cases"] += 1.0
    return sums


def metrics_from(sums: Mapping[str, float]) -> dict[str, float]:
    """Mean Dice per class (``dice_<k>``), their mean (``dice``) and ``dice_loss`` = 1 - dice (the validation
    metric: lower is better)."""
    classes = sorted(int(k.rsplit("_", 1)[1]) for k in sums if k.startswith("dice_sum_"))
    per_class = {k: sums[f"dice_sum_{k}"] / sums[f"dice_n_{k}"] for k in classes if sums.get(f"dice_n_{k}", 0) > 0}
    if not per_class:
        return {"dice": 0.0, "dice_loss": 1.0}
    mean = sum(per_class.values()) / len(per_class)
    return {**{f"dice_{k}": v for k, v in per_class.items()}, "dice": mean, "dice_loss": 1.0 - mean}
