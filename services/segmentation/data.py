"""Volumes and masks: readers of the MSD and BraTS layouts, a synthetic generator, MONAI transforms and datasets.

Layouts (``layout=auto`` recognises them):

- **MSD** (Medical Segmentation Decathlon): ``dataset.json`` (``modality``, ``labels``, ``training``: image and
  label paths), ``imagesTr/``, ``labelsTr/``; an image is 3-D (one channel) or 4-D (channels last).
- **BraTS**: a folder per case, anywhere below the root, with one NIfTI per modality and a segmentation: the
  2020/2021 naming ``<case>_flair``, ``_t1``, ``_t1ce``, ``_t2``, ``_seg``, or BraTS 2015 as prepared for
  DeepMedic (``Flair_*``, ``T1c_*``, ..., ``OTMultiClass``). Channels are the modalities every case has, in the
  order flair, t1, t1ce, t2.

Every volume goes through the same deterministic MONAI preprocessing (load, channel first, RAS orientation,
resampling to ``spacing``, per-channel z-scoring inside the non-zero region, label values mapped to classes
0..K-1), cached in memory; training adds random patches (foreground-oversampled), flips and intensity jitter.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shared.saved import SavedState

from .config import REGIONS, SegmentationConfig

AXCODES = "RAS"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
MODALITIES = ("flair", "t1", "t1ce", "t2")  # BraTS channel order
BRATS_LABELS = {
    "brats2015": {1: "necrosis", 2: "oedema", 3: "non_enhancing", 4: "enhancing"},
    "brats2020": {1: "necrotic_core", 2: "oedema", 4: "enhancing"},
}
NIFTI = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[str, ...]  # one path per channel, or one 4-D file
    label: str | None


@dataclass
class Collection:
    """The cases of a folder and what their labels mean."""

    cases: list[Case]
    layout: str  # msd | brats | synthetic
    channels: tuple[str, ...]
    label_values: tuple[int, ...]  # the label file's values, background (0) first
    label_names: tuple[str, ...]
    label_set: str  # a REGIONS key or "labels"
    name: str
    notes: list[str] = field(default_factory=list)


class LayoutError(ValueError):
    """A folder that is neither in the MSD nor in a BraTS layout (or is missing files)."""


def load_nifti(path: str | Path) -> Any:
    """``nibabel.load`` (typed loosely: nibabel's stubs know only its base image class)."""
    import nibabel as nib

    return nib.load(str(path))


def _nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_layout(root: Path) -> str:
    if (root / "dataset.json").is_file():
        return "msd"
    if any(_brats_role(p) == "seg" for p in root.rglob("*") if p.is_file() and _nifti(p)):
        return "brats"
    raise LayoutError(f"{root}: no dataset.json (MSD layout) and no BraTS segmentation file (*_seg.nii.gz or "
                      f"OTMultiClass*.nii.gz) below it")


def read_msd(root: Path) -> Collection:
    spec = json.loads((root / "dataset.json").read_text())
    modality = spec.get("modality") or spec.get("channel_names") or {"0": "image"}
    channels = tuple(str(modality[k]) for k in sorted(modality, key=int))
    raw_labels = spec.get("labels") or {}
    if not all(str(k).isdigit() for k in raw_labels):  # nnU-Net v2 maps names to values, and lists no cases
        raise LayoutError(f"{root}/dataset.json: labels {dict(raw_labels)} are not the MSD form (label value -> name)")
    labels = {int(k): str(v) for k, v in raw_labels.items()}
    labels.setdefault(0, "background")
    cases, notes = [], []
    for entry in spec.get("training", []):
        image = root / str(entry["image"]).removeprefix("./")
        label = root / str(entry["label"]).removeprefix("./") if entry.get("label") else None
        if not image.is_file() or (label is not None and not label.is_file()):
            notes.append(f"{_stem(image)}: listed in dataset.json but its image or label file is missing: left out")
            continue
        cases.append(Case(_stem(image), (str(image),), str(label) if label else None))
    if not cases:
        raise LayoutError(f"{root}/dataset.json lists no training case whose files exist")
    values = tuple(sorted(labels))
    return Collection(cases, "msd", channels, values, tuple(labels[v] for v in values), "labels",
                      str(spec.get("name") or root.name), notes)


_BRATS_ROLES = {"seg": ("seg", "otmulticlass", "ot"), "flair": ("flair", "fla"), "t1ce": ("t1ce", "t1c", "t1gd"),
                "t1": ("t1",), "t2": ("t2",)}


def _brats_role(path: Path) -> str | None:
    """The modality (or "seg") a BraTS file holds, from its name: ``..._t1ce.nii.gz``, ``T1c_subtr....nii.gz``."""
    tokens = [t for t in re.split(r"[_\-.]", _stem(path).lower()) if t]
    for role in ("seg", "t1ce", "flair", "t2", "t1"):  # t1ce before t1
        if any(t in _BRATS_ROLES[role] for t in tokens):
            return role
    return None


def read_brats(root: Path) -> Collection:
    folders: dict[Path, dict[str, Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and _nifti(path):
            role = _brats_role(path)
            if role is not None:
                folders.setdefault(path.parent, {}).setdefault(role, path)
    cases_roles = {f: roles for f, roles in folders.items() if "seg" in roles}
    if not cases_roles:
        raise LayoutError(f"{root}: no case folder with a segmentation file")
    shared_modalities = [m for m in MODALITIES if all(m in roles for roles in cases_roles.values())]
    if not shared_modalities:
        raise LayoutError(f"{root}: no modality (flair, t1, t1ce, t2) present in every case")
    notes = []
    for folder, roles in cases_roles.items():
        extra = sorted(set(roles) - {"seg", *shared_modalities})
        if extra:
            notes.append(f"{folder.name}: {extra} not in every case: not used")
    seg_names = [roles["seg"].name.lower() for roles in cases_roles.values()]
    label_set = "brats2015" if all("otmulticlass" in n or n.startswith("ot") for n in seg_names) else "brats2020"
    cases = [Case(folder.name, tuple(str(roles[m]) for m in shared_modalities), str(roles["seg"]))
             for folder, roles in sorted(cases_roles.items(), key=lambda kv: kv[0].name)]
    names = BRATS_LABELS[label_set]
    return Collection(cases, "brats", tuple(shared_modalities), (0, *names), ("background", *names.values()),
                      label_set, root.name, notes)


def read_collection(path: str, layout: str = "auto") -> Collection:
    from shared import datapath

    if datapath.is_uri(path):
        raise LayoutError(f"{path}: segmentation reads a local folder (copy the MSD or BraTS folder here first)")
    root = Path(path)
    if not root.is_dir():
        raise LayoutError(f"{path}: not a folder (segmentation data is a folder in the MSD or a BraTS layout)")
    kind = detect_layout(root) if layout == "auto" else layout
    return read_msd(root) if kind == "msd" else read_brats(root)


def regions_for(collection: Collection, regions: str) -> dict[str, tuple[int, ...]]:
    """Evaluation regions: name -> label values (each label alone for "labels")."""
    chosen = collection.label_set if regions == "auto" else regions
    if chosen in REGIONS:
        return dict(REGIONS[chosen])
    return {name: (value,) for value, name in zip(collection.label_values, collection.label_names, strict=True)
            if value != 0}


def fingerprint(cases: Sequence[Case]) -> str:
    digest = hashlib.sha256()
    for case in cases:
        for name in (*case.images, case.label or ""):
            path = Path(name)
            digest.update(f"{case.case_id}:{path.name}:{path.stat().st_size if path.exists() else 0}".encode())
    return digest.hexdigest()[:16]


# --- synthetic volumes, written in the MSD layout -------------------------------------------------------------

def synthetic_case(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One MR-like volume (float32) and its labels (uint8), both (X, Y, Z): an ellipsoid (label 1) and a smaller
    blob touching it (label 2), intensity contrast, a smooth multiplicative bias field, Rician-like noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), axis=-1)  # (X, Y, Z, 3)
    centre = rng.uniform(-0.25, 0.25, 3)
    radii = rng.uniform(0.25, 0.45, 3)
    body = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    offset = centre + rng.choice([-1, 1], 3) * radii * 0.7
    blob = (((grid - offset) / (radii * 0.45)) ** 2).sum(-1) <= 1.0
    label = np.zeros(tuple(shape), dtype=np.uint8)
    label[body] = 1
    label[blob] = 2
    tissue = 0.3 + 0.1 * np.sin(3 * grid[..., 0] + rng.uniform(0, 6)) * np.cos(2 * grid[..., 1])
    image = tissue + 0.45 * (label == 1) + 0.8 * (label == 2)
    bias = np.exp(0.25 * (grid @ rng.normal(size=3)))  # a smooth multiplicative field
    image = image * bias
    noise = rng.normal(0, 0.08, (2, *shape))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)  # Rician-like magnitude
    return image, label


def write_synthetic(root: Path, n_cases: int, shape: Sequence[int] = (48, 48, 48), seed: int = 0) -> Path:
    """``n_cases`` volumes of :func:`synthetic_case` in the MSD layout, saved in LPS orientation at 1.2 mm (so
    the preprocessing's reorientation and resampling are exercised)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.2, -1.2, 1.2, 1.0])  # LPS
    training = []
    for i in range(n_cases):
        image, label = synthetic_case(shape, rng)
        name = f"synthetic_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    spec = {"name": "synthetic", "description": "Tessera synthetic volumes", "tensorImageSize": "3D",
            "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "body", "2": "blob"},
            "numTraining": n_cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(spec, indent=1))
    return root


def synthetic_collection(cfg: SegmentationConfig, folder: Path) -> Collection:
    shape = "x".join(str(s) for s in cfg.synthetic_shape)
    root = folder / f"synthetic-{cfg.synthetic_cases}-{shape}-{cfg.seed}"
    if not (root / "dataset.json").is_file():
        write_synthetic(root, cfg.synthetic_cases, cfg.synthetic_shape, seed=cfg.seed)
    collection = read_msd(root)
    collection.layout, collection.name = "synthetic", f"synthetic:{cfg.synthetic_cases}:{shape}:{cfg.seed}"
    return collection


# --- the state saved with a model -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentationState(SavedState):
    """What a segmentation model keeps from its data: channels, labels, regions, its grid and patch, the split."""

    data: str
    fingerprint: str
    layout: str
    channels: tuple[str, ...]
    label_values: tuple[int, ...]  # class k of the network is label value label_values[k]
    label_names: tuple[str, ...]
    regions: dict[str, tuple[int, ...]]  # evaluation region -> label values
    spacing: tuple[float, ...]
    patch: tuple[int, ...]
    cases: dict[str, tuple[str, ...]]  # train / val / test case ids


def split_cases(n: int, val_fraction: float, test_fraction: float, seed: int, folds: int = 0,
                fold: int = 0) -> tuple[list[int], ...]:
    """Train / validation / test indices by case (each held-out part at least one case), from the ``seed``'s
    order of the cases. ``folds`` > 1: k-fold cross-validation, the test cases are part ``fold`` of that order
    cut into ``folds`` (every case is tested in exactly one fold), validation ``val_fraction`` of the rest."""
    if n < 3:
        raise ValueError(f"{n} labelled case(s): at least 3 are needed (train, validation, test)")
    order = np.random.default_rng(seed).permutation(n)
    if folds:
        if not 2 <= folds <= n or not 0 <= fold < folds:
            raise ValueError(f"folds={folds} fold={fold}: need 2 <= folds <= {n} cases and 0 <= fold < folds")
        test = np.array_split(order, folds)[fold]
        rest = order[~np.isin(order, test)]
        if len(rest) < 2:
            raise ValueError(f"folds={folds} of {n} cases leave {len(rest)} case(s) for training and validation")
        n_val = min(max(1, round(len(rest) * val_fraction)), len(rest) - 1)
        val, train = rest[:n_val], rest[n_val:]
        return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_test - n_val < 1:
        n_test, n_val = 1, 1
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())


def case_repeats(n_cases: int, cfg: SegmentationConfig) -> int:
    """How many times an epoch visits each training case to draw at least ``cfg.patches_per_epoch`` patches."""
    if not cfg.patches_per_epoch or not n_cases:
        return 1
    return max(1, math.ceil(cfg.patches_per_epoch / (n_cases * cfg.samples_per_case)))


def auto_patch(cases: Sequence[Case], cfg: SegmentationConfig) -> tuple[int, int, int]:
    """The median shape of the cases after resampling to ``cfg.spacing``, rounded down to multiples of 8 (at
    least 8, at most ``max_patch``): patches a little smaller than the typical volume, so that random crops move."""
    if cfg.patch:
        return (int(cfg.patch[0]), int(cfg.patch[1]), int(cfg.patch[2]))
    shapes = []
    for case in cases[:64]:
        image = load_nifti(case.images[0])
        zooms = np.abs(np.asarray(image.header.get_zooms()[:3], dtype=np.float64))
        from nibabel.orientations import io_orientation

        ornt = io_orientation(image.affine)
        extent = np.asarray(image.shape[:3]) * zooms
        shapes.append(np.ceil(extent[ornt[:, 0].astype(int).argsort()] / np.asarray(cfg.spacing)))
    median = np.median(np.asarray(shapes), axis=0)
    sides = [int(min(cfg.max_patch, max(8, 8 * np.floor(s / 8)))) for s in median]
    return sides[0], sides[1], sides[2]


# --- MONAI transforms ---------------------------------------------------------------------------------------

def preprocessing(state: SegmentationState, with_label: bool = True) -> Any:
    """The deterministic part, shared by training, evaluation and serving (and inverted for predictions)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        MapLabelValued,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
    )

    keys = ["image", "label"] if with_label else ["image"]
    steps: list[Any] = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        EnsureTyped(keys, dtype=torch.float32, track_meta=True),
        Orientationd(keys, axcodes=AXCODES, labels=RAS_LABELS),
        Spacingd(keys, pixdim=tuple(state.spacing), mode=("bilinear", "nearest")[: len(keys)]),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]
    if with_label:
        steps.append(MapLabelValued("label", orig_labels=list(state.label_values),
                                    target_labels=list(range(len(state.label_values)))))
    return Compose(steps)


def augmentation(state: SegmentationState, cfg: SegmentationConfig) -> Any:
    """Random patches (foreground-oversampled) and flips, with ``augment=light`` a +-10 % intensity jitter; with
    ``augment=strong`` the kinds of nnU-Net's default augmentation, in MONAI's transforms and at about its
    probabilities: rotation (+-30 degrees about each axis) and scaling (0.7-1.3) of the patch, Gaussian noise,
    Gaussian blur, brightness per channel (x0.75-1.25), gamma (0.7-1.5, the intensity statistics kept), and
    the flips. Each patch draws its own."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    patch = tuple(state.patch)
    pos = cfg.foreground_fraction
    crop = [
        SpatialPadd(["image", "label"], spatial_size=patch),
        RandCropByPosNegLabeld(["image", "label"], label_key="label", spatial_size=patch, pos=pos, neg=1 - pos,
                               num_samples=cfg.samples_per_case, allow_smaller=False),
    ]
    flips = [RandFlipd(["image", "label"], prob=0.5, spatial_axis=axis) for axis in range(3)]
    if cfg.augment == "light":
        return Compose([*crop, *flips, RandScaleIntensityd("image", factors=0.1, prob=0.5),
                        RandShiftIntensityd("image", offsets=0.1, prob=0.5)])
    angle = np.pi / 6
    return Compose([
        *crop,
        RandAffined(["image", "label"], prob=0.35, rotate_range=(angle, angle, angle), scale_range=(0.3, 0.3, 0.3),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", factors=0.25, prob=0.15, channel_wise=True),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        *flips,
    ])


class VolumeDataset(torch.utils.data.Dataset[Any]):
    """Preprocessed volumes (cached after the first read); with ``augment``, each access draws random patches
    (a list of ``samples_per_case`` dicts). ``repeats`` > 1 lists every case that many times (an epoch of a few
    large volumes then has more than one step); index ``i`` is case ``i % len(cases)``."""

    def __init__(self, cases: Sequence[Case], state: SegmentationState, augment: Callable[[Any], Any] | None = None,
                 repeats: int = 1) -> None:
        if repeats < 1 or (repeats > 1 and augment is None):
            raise ValueError(f"repeats={repeats}: at least 1, and more than 1 only for random patches")
        self.cases, self.state, self.augment, self.repeats = list(cases), state, augment, repeats
        self._pre = preprocessing(state)
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.cases) * self.repeats

    def volume(self, index: int) -> dict[str, Any]:
        index %= len(self.cases)
        if index not in self._cache:
            case = self.cases[index]
            item = self._pre({"image": list(case.images) if len(case.images) > 1 else case.images[0],
                              "label": case.label})
            item["case_id"] = case.case_id
            self._cache[index] = item
        return self._cache[index]

    def __getitem__(self, index: int) -> Any:
        item = self.volume(index)
        if self.augment is None:
            return item
        return self.augment({"image": item["image"], "label": item["label"]})


@dataclass
class Batch:
    """Stacked patches, or whole volumes of different shapes (lists)."""

    images: Tensor | list[Tensor]  # (B, C, X, Y, Z) or B x (C, X, Y, Z)
    labels: Tensor | list[Tensor]  # (B, 1, X, Y, Z) or B x (1, X, Y, Z), class indices
    case_ids: list[str]

    def __len__(self) -> int:
        return len(self.case_ids)

    def volumes(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.images[i], self.labels[i]) for i in range(len(self))]


def _plain(t: Any) -> Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def collate(items: list[Any]) -> Batch:
    """Patches (lists of dicts from the random crops) or volumes; plain tensors, no MONAI metadata."""
    flat = [x for item in items for x in (item if isinstance(item, list) else [item])]
    images = [_plain(x["image"]).float() for x in flat]
    labels = [_plain(x["label"]).long() for x in flat]
    ids = [str(x.get("case_id", "patch")) for x in flat]
    if len({tuple(t.shape) for t in images}) == 1:
        return Batch(torch.stack(images), torch.stack(labels), ids)
    return Batch(images, labels, ids)
