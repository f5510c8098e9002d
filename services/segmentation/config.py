"""Settings of the segmentation domain (3-D medical image segmentation: a transformer U-Net with reversible blocks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.config import RunSettings, require_at_least

MODELS = ("revunet",)
MEMORY_MODES = ("reversible", "checkpoint", "plain")

# Evaluation regions: label set -> region name -> the labels it unites. BraTS 2015: 1 necrosis, 2 oedema,
# 3 non-enhancing tumour, 4 enhancing tumour; BraTS 2020/2021: 1 necrotic and non-enhancing core, 2 oedema,
# 4 enhancing (no 3). Whole tumour = every tumour label, tumour core = all but oedema, enhancing = 4.
REGIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brats2015": {"whole_tumour": (1, 2, 3, 4), "tumour_core": (1, 3, 4), "enhancing": (4,)},
    "brats2020": {"whole_tumour": (1, 2, 4), "tumour_core": (1, 4), "enhancing": (4,)},
}


# Defaults for MSD Task04 (hippocampus: ~35x50x35 voxels at 1 mm, one MR channel, two labels).
@dataclass(frozen=True)
class SegmentationConfig(RunSettings, batch_size=2, lr=1e-3, lr_schedule="cosine", weight_decay=1e-4, epochs=30,
                         patience=0, grad_clip=1.0, seed=0, precision="fp32"):
    model: str = "revunet"  # one of MODELS
    data: str | None = None  # a folder in the MSD layout (dataset.json, imagesTr/, labelsTr/) or the BraTS layouts;
    # None: synthetic volumes written in the MSD layout
    layout: Literal["auto", "msd", "brats"] = "auto"
    regions: str = "auto"  # a REGIONS key, or "labels" (each label its own region); auto: by the label set found
    synthetic_cases: int = 24  # synthetic volumes when data is None
    synthetic_shape: tuple[int, ...] = (48, 48, 48)
    val_fraction: float = 0.1  # cases held out for validation (at least one)
    test_fraction: float = 0.2  # cases held out for test (at least one)
    # k-fold cross-validation by case (nnU-Net's 5 folds, say): > 1 cuts the seed's order of the cases into that
    # many parts and tests on part `fold` (0-based), validating on val_fraction of the rest; 0: test_fraction
    folds: int = 0
    fold: int = 0  # the part tested when folds > 1 (0-based)
    max_cases: int = 0  # > 0: use only that many cases (smoke runs)

    # the grid the network sees: canonical orientation (RAS) and this voxel spacing (mm)
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    patch: tuple[int, ...] = ()  # training patch (multiples of 8); (): the median volume shape rounded down to
    # a multiple of 8, each side at most max_patch (MSD hippocampus: 32 x 48 x 32; BraTS: 96^3)
    max_patch: int = 96
    samples_per_case: int = 2  # random patches per case per epoch (a step sees batch_size x samples_per_case)
    patches_per_epoch: int = 0  # > 0: an epoch revisits the training cases until it has drawn at least this many
    # patches (a few large volumes, as BraTS: one pass over 2 cases is one step); 0: each case once per epoch
    foreground_fraction: float = 0.67  # of patches centred on a labelled voxel (nnU-Net oversamples foreground)
    augment: Literal["light", "strong"] = "light"  # light: flips and +-10 % intensity; strong: nnU-Net's kind
    # of spatial and intensity augmentation too (rotation, scaling, noise, blur, per-channel brightness and
    # gamma; see data.augmentation), for a few training cases that must carry over to a new one (BraTS)

    # the network: reversible mobile inverted bottlenecks at 1, 1/2 and 1/4 resolution, a transformer at 1/8
    channels: int = 16  # at full resolution (doubled at each of the first two downsamplings)
    depth: int = 2  # reversible blocks per stage (encoder and decoder)
    expansion: int = 2  # of the mobile inverted bottleneck's 1x1x1 expansion (4: 2.5x the CPU time per step)
    d_model: int = 128  # transformer width at 1/8 resolution
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    memory: Literal["reversible", "checkpoint", "plain"] = "reversible"  # how the blocks keep their activations

    # inference: MONAI sliding windows of the training patch, Gaussian blending
    overlap: float = 0.5
    sw_batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: expected one of {list(MODELS)}")
        require_at_least(self, 1, ("synthetic_cases", "samples_per_case", "channels", "depth", "expansion",
                                   "d_model", "n_heads", "n_layers", "d_ff", "sw_batch_size", "max_patch"))
        require_at_least(self, 0, ("max_cases", "patches_per_epoch"))
        if self.channels % 2 or self.d_model % self.n_heads:
            raise ValueError(f"channels={self.channels} must be even and d_model={self.d_model} a multiple of "
                             f"n_heads={self.n_heads}")
        for name in ("spacing", "synthetic_shape"):
            if len(getattr(self, name)) != 3 or min(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={list(getattr(self, name))}: three positive numbers")
        if self.patch and (len(self.patch) != 3 or any(p < 8 or p % 8 for p in self.patch)):
            raise ValueError(f"patch={list(self.patch)}: three sides, each a multiple of 8")
        if self.max_patch < 8 or self.max_patch % 8:
            raise ValueError(f"max_patch={self.max_patch} must be a multiple of 8")
        if not (0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise ValueError("val_fraction and test_fraction must be in (0, 0.5)")
        if self.folds == 1 or self.folds < 0 or not 0 <= self.fold < max(self.folds, 1):
            raise ValueError(f"folds={self.folds} fold={self.fold}: folds is 0 (no cross-validation) or at least 2, "
                             f"and 0 <= fold < folds")
        for name in ("foreground_fraction", "dropout", "overlap"):
            if not 0.0 <= getattr(self, name) < 1.0 + (name == "foreground_fraction"):
                raise ValueError(f"{name}={getattr(self, name)} out of range")
        if self.augment not in ("light", "strong"):
            raise ValueError(f"augment={self.augment!r}: expected light or strong")
        if self.regions not in ("auto", "labels", *REGIONS):
            raise ValueError(f"regions={self.regions!r}: expected auto, labels or one of {list(REGIONS)}")


@dataclass(frozen=True)
class SegmentationEvalConfig:
    """Settings of the evaluation (``python -m pipelines.evaluate segmentation --set key=value``)."""

    hd_percentile: float = 95.0  # the Hausdorff distance's percentile (HD95)
    figure_cases: int = 3  # cases shown in the slice figure

    def __post_init__(self) -> None:
        if not 0 < self.hd_percentile <= 100:
            raise ValueError(f"hd_percentile={self.hd_percentile} must be in (0, 100]")
        require_at_least(self, 0, ("figure_cases",))
