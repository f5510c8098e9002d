"""RevUNet: reversible gradients equal plain ones on the whole network, what the modes keep for the backward pass,
shapes; the Dice and HD95 of the evaluation against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.segmentation.config import SegmentationConfig
from services.segmentation.data import Batch
from services.segmentation.evaluation import region_scores
from services.segmentation.model import RevUNet
from services.segmentation.training import case_dice, metrics_from
from shared.reversible import SavedBytes

SMALL = {"channels": 4, "expansion": 2, "depth": 2, "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32,
         "dropout": 0.1}


def _net(memory: str) -> RevUNet:
    """The same weights for every mode; the zero-initialised projections perturbed, so that no block is the
    identity and every gradient is non-zero."""
    torch.manual_seed(0)
    net = RevUNet(SegmentationConfig(memory=memory, **SMALL), in_channels=2, n_classes=3)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _grads(net: RevUNet, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.train()
    torch.manual_seed(5)  # dropout draws
    y = net(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in net.parameters()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize(("memory", "dtype", "tol"), [
    ("reversible", torch.float32, 5e-5), ("checkpoint", torch.float32, 5e-5),
    ("reversible", torch.float64, 1e-12),  # exact up to rounding: the recomputed inputs are the forward's
])
def test_the_whole_network_has_the_plain_runs_outputs_and_gradients(memory: str, dtype: torch.dtype,
                                                                     tol: float) -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        x = torch.randn(2, 2, 16, 16, 24)
        y_ref, g_ref = _grads(_net("plain"), x)
        y, g = _grads(_net(memory), x)
    finally:
        torch.set_default_dtype(default)
    assert _relative(y, y_ref) < 10 * tol
    assert len(g) == len(g_ref) and all(float(t.abs().sum()) > 0 for t in g_ref)  # every parameter has a gradient
    # each tensor within tol of its own size; biases in front of a GroupNorm have a structurally zero gradient
    # (rounding only), so the floor is a thousandth of the largest gradient
    scale = max(float(b.norm()) for b in g_ref)
    worst = max(float((a - b).norm()) / (float(b.norm()) + 1e-3 * scale) for a, b in zip(g, g_ref, strict=True))
    assert worst < tol, worst
    everything = _relative(torch.cat([a.flatten() for a in g]), torch.cat([b.flatten() for b in g_ref]))
    assert everything < tol / 10, everything


def _saved_bytes(net: RevUNet, x: torch.Tensor) -> int:
    with SavedBytes() as saved:
        y = net.train()(x)
    y.sum().backward()
    return saved.total


def test_the_reversible_network_keeps_under_a_third_of_the_plain_activations() -> None:
    x = torch.randn(1, 2, 32, 32, 32)
    plain, reversible = _saved_bytes(_net("plain"), x), _saved_bytes(_net("reversible"), x)
    checkpointed = _saved_bytes(_net("checkpoint"), x)
    assert reversible < plain / 3 and reversible < checkpointed < plain


def test_sides_must_be_multiples_of_8() -> None:
    net = _net("plain").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, 8, 16, 24)).shape == (1, 3, 8, 16, 24)
        with pytest.raises(ValueError, match="multiples of 8"):
            net(torch.randn(1, 2, 8, 16, 20))


def test_case_dice_and_the_mean_over_cases() -> None:
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1  # 32 voxels of class 1, no class 2
    pred = torch.zeros(1, 3, 4, 4, 4)
    pred[0, 0] = 1.0
    pred[0, 0, :1], pred[0, 1, :1] = 0.0, 1.0  # 16 voxels predicted 1, all inside the truth
    dice = case_dice(pred, label, 3)
    assert math.isclose(float(dice[0]), 2 * 16 / (16 + 32), rel_tol=1e-6) and math.isnan(float(dice[1]))
    found = metrics_from({"dice_sum_1": 1.5, "dice_n_1": 2.0, "dice_sum_2": 0.0, "dice_n_2": 0.0, "cases": 2.0})
    assert found == {"dice_1": 0.75, "dice": 0.75, "dice_loss": 0.25}


def test_validation_scores_the_evaluation_regions() -> None:
    """BraTS-style regions (labels united) are what validation means, and so what picks the kept epoch; with one
    label per region (MSD hippocampus) the mean is the classes' mean, as before regions were scored."""
    from services.segmentation.training import metric_sums, region_classes

    assert region_classes({"whole": (1, 2, 4), "enhancing": (4,)}, (0, 1, 2, 4)) == {"whole": (1, 2, 3),
                                                                                      "enhancing": (3,)}

    class Fixed(torch.nn.Module):  # "segments" by returning the given probabilities
        def __init__(self, probabilities: torch.Tensor, regions: dict[str, tuple[int, ...]]) -> None:
            super().__init__()
            self.probabilities, self.n_classes, self.region_classes = probabilities, 3, regions

        def segment(self, image: torch.Tensor) -> torch.Tensor:
            return self.probabilities

    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, :2] = 1  # 32 voxels of class 1
    label[0, 2] = 2  # 16 of class 2
    pred = torch.zeros(1, 3, 4, 4, 4)
    pred[0, 0] = 1.0
    pred[0, 0, :3], pred[0, 2, :3] = 0.0, 1.0  # 48 voxels predicted 2: class 1 wrong, the union exact
    batch = Batch([torch.zeros(1, 4, 4, 4)], [label], ["a"])
    united = metrics_from(metric_sums(Fixed(pred, {"tumour": (1, 2), "core": (2,)}), [batch], torch.device("cpu")))
    assert united["dice_1"] == 0.0 and math.isclose(united["dice_2"], 2 * 16 / (16 + 48), rel_tol=1e-6)
    assert united["dice_tumour"] == 1.0 and math.isclose(united["dice_core"], united["dice_2"], rel_tol=1e-6)
    assert math.isclose(united["dice"], (1.0 + 0.5) / 2, rel_tol=1e-6)  # the regions' mean, not the labels'
    per_label = metrics_from(metric_sums(Fixed(pred, {"a": (1,), "b": (2,)}), [batch], torch.device("cpu")))
    plain = metrics_from(metric_sums(Fixed(pred, {}), [batch], torch.device("cpu")))
    assert math.isclose(per_label["dice"], plain["dice"], rel_tol=1e-6) and plain["dice"] == (0.0 + 0.5) / 2


def test_region_dice_and_hd95_by_hand() -> None:
    truth = np.zeros((20, 20, 20), dtype=np.int64)
    truth[5:15, 5:15, 5:15] = 2
    truth[8:12, 8:12, 8:12] = 4  # enhancing inside the core
    pred = np.zeros_like(truth)
    pred[7:17, 5:15, 5:15] = 2  # the same cube shifted by 2 voxels along x
    found = region_scores(pred, truth, {"whole": (2, 4), "enhancing": (4,)}, spacing=(1.5, 1.0, 1.0))
    # two 1000-voxel cubes overlapping in 8 x 10 x 10
    assert math.isclose(found["dice"]["whole"], 2 * 800 / 2000, rel_tol=1e-6)
    assert math.isclose(found["hd95"]["whole"], 3.0, rel_tol=1e-6)  # 2 voxels x 1.5 mm
    assert math.isnan(found["dice"]["enhancing"]) is False and found["dice"]["enhancing"] == 0.0
    assert math.isnan(found["hd95"]["enhancing"])  # nothing predicted: no distance
