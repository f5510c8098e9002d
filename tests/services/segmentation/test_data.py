"""Segmentation data: the MSD and BraTS readers (on the real folders when present), regions, the synthetic
generator, splits by case, the exact round trip to the input's grid, and the input checks."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from services.segmentation.config import SegmentationConfig
from services.segmentation.data import (
    LayoutError,
    SegmentationState,
    preprocessing,
    read_brats,
    read_collection,
    regions_for,
    split_cases,
    write_synthetic,
)
from services.segmentation.inference import check_inputs, predict_classes, run_items
from shared.loaded import LoadedModel
from shared.serving import RequestError

REAL = Path(__file__).resolve().parents[4] / "shared" / "data" / "medical_segmentation"


def _needs(folder: str) -> Path:
    path = REAL / folder
    if not path.is_dir():
        pytest.skip(f"{path} is not on this machine")
    return path


def test_the_msd_hippocampus_folder() -> None:
    found = read_collection(str(_needs("msd_task04_hippocampus")))
    assert found.layout == "msd" and len(found.cases) == 208 and found.channels == ("MRI",)
    assert found.label_values == (0, 1, 2) and found.label_names == ("background", "Anterior", "Posterior")
    assert regions_for(found, "auto") == {"Anterior": (1,), "Posterior": (2,)}
    assert all(Path(c.images[0]).is_file() and Path(str(c.label)).is_file() for c in found.cases)


def test_the_brats_2015_folder_and_its_regions() -> None:
    found = read_collection(str(_needs("brats2015_deepmedic")))
    assert found.layout == "brats" and found.label_set == "brats2015" and found.channels == ("flair", "t1ce")
    assert sorted(c.case_id for c in found.cases) == ["brats_2013_pat0003_1", "brats_2013_pat0004_1",
                                                       "brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    assert all(Path(p).name.startswith(("Flair", "T1c")) for c in found.cases for p in c.images)
    assert regions_for(found, "auto") == {"whole_tumour": (1, 2, 3, 4), "tumour_core": (1, 3, 4), "enhancing": (4,)}


def _touch(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))


def test_the_brats_2020_naming_and_modalities_missing_in_some_cases(tmp_path: Path) -> None:
    for case, modalities in (("BraTS20_001", ("flair", "t1", "t1ce", "t2")), ("BraTS20_002", ("flair", "t1ce", "t2"))):
        folder = tmp_path / "train" / case
        folder.mkdir(parents=True)
        for m in (*modalities, "seg"):
            _touch(folder / f"{case}_{m}.nii.gz")
    found = read_brats(tmp_path)
    assert found.label_set == "brats2020" and found.label_values == (0, 1, 2, 4)
    assert found.channels == ("flair", "t1ce", "t2")  # t1 is not in every case
    assert [Path(p).name for p in found.cases[0].images] == ["BraTS20_001_flair.nii.gz", "BraTS20_001_t1ce.nii.gz",
                                                            "BraTS20_001_t2.nii.gz"]
    assert any("not in every case" in n for n in found.notes)
    assert regions_for(found, "auto") == {"whole_tumour": (1, 2, 4), "tumour_core": (1, 4), "enhancing": (4,)}
    assert regions_for(found, "labels") == {"necrotic_core": (1,), "oedema": (2,), "enhancing": (4,)}


def test_a_folder_in_no_known_layout_is_refused(tmp_path: Path) -> None:
    _touch(tmp_path / "scan.nii.gz")
    with pytest.raises(LayoutError, match="no dataset.json"):
        read_collection(str(tmp_path))
    with pytest.raises(LayoutError, match="not a folder"):
        read_collection(str(tmp_path / "scan.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1}, "training": []}))
    with pytest.raises(LayoutError, match="not the MSD form"):
        read_collection(str(tmp_path))


def test_synthetic_volumes_in_the_msd_layout(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path, 3, (24, 20, 16), seed=1)
    spec = json.loads((root / "dataset.json").read_text())
    assert spec["numTraining"] == 3 and len(spec["training"]) == 3
    found = read_collection(str(root))
    image, label = nib.load(found.cases[0].images[0]), nib.load(str(found.cases[0].label))
    assert image.shape == label.shape == (24, 20, 16) and nib.aff2axcodes(image.affine) == ("L", "P", "S")
    values = np.asarray(label.dataobj)
    assert set(np.unique(values)) == {0, 1, 2}
    data = np.asarray(image.dataobj)
    assert data[values == 2].mean() > data[values == 1].mean() > data[values == 0].mean()  # contrast


def test_splits_are_by_case_disjoint_and_complete() -> None:
    train, val, test = split_cases(208, 0.1, 0.2, seed=0)
    assert (len(train), len(val), len(test)) == (145, 21, 42)
    assert sorted(train + val + test) == list(range(208))
    assert split_cases(208, 0.1, 0.2, seed=0) == (train, val, test)
    assert split_cases(3, 0.1, 0.2, seed=0)[0] and split_cases(3, 0.1, 0.2, seed=0)[1]
    with pytest.raises(ValueError, match="at least 3"):
        split_cases(2, 0.1, 0.2, seed=0)


@pytest.mark.parametrize(("n", "folds"), [(4, 4), (208, 5), (7, 3)])
def test_cross_validation_folds_test_every_case_exactly_once(n: int, folds: int) -> None:
    splits = [split_cases(n, 0.1, 0.2, seed=0, folds=folds, fold=k) for k in range(folds)]
    tested = sorted(i for _, _, test in splits for i in test)
    assert tested == list(range(n))  # each case in one fold's test part
    for train, val, test in splits:
        assert sorted(train + val + test) == list(range(n)) and train and val
        assert abs(len(test) - n / folds) < 1
    assert [len(v) for _, v, _ in splits] == [max(1, round((n - len(t)) * 0.1)) for _, _, t in splits]
    with pytest.raises(ValueError, match="folds=5"):
        split_cases(4, 0.1, 0.2, seed=0, folds=5, fold=0)
    with pytest.raises(ValueError, match="fold=4"):
        SegmentationConfig(folds=4, fold=4)


def _state(spacing: tuple[float, ...]) -> SegmentationState:
    return SegmentationState(data="t", fingerprint="f", layout="msd", channels=("MRI",), label_values=(0, 1, 2),
                             label_names=("background", "a", "b"), regions={"a": (1,), "b": (2,)}, spacing=spacing,
                             patch=(16, 16, 16), cases={"train": (), "val": (), "test": ()})


class _Oracle:
    """A "model" whose prediction is the preprocessed truth: what comes back must be the label file itself."""

    def __init__(self, state: SegmentationState, image: str, label: str) -> None:
        item = preprocessing(state)({"image": image, "label": label})
        self.classes = item["label"].as_tensor().long()  # (1, X', Y', Z') on the network's grid
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):  # type: ignore[no-untyped-def]
        return iter([self.weight])

    def eval(self) -> _Oracle:
        return self

    def segment(self, volume: torch.Tensor) -> torch.Tensor:
        assert volume.shape[2:] == self.classes.shape[1:]
        return torch.nn.functional.one_hot(self.classes[0], 3).permute(3, 0, 1, 2)[None].float()


@pytest.mark.parametrize(("affine", "spacing"), [
    (np.diag([-2.0, -2.0, 2.0, 1.0]), (1.0, 1.0, 1.0)),  # LPS at 2 mm: reoriented and upsampled for the network
    (np.diag([1.2, -1.2, -1.2, 1.0]), (1.2, 1.2, 1.2)),  # RPI at the model's spacing: reoriented only
])
def test_a_prediction_goes_back_to_the_inputs_grid_exactly(tmp_path: Path, affine: np.ndarray,
                                                           spacing: tuple[float, ...]) -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (13, 11, 9)).astype(np.uint8)
    image = rng.normal(size=(13, 11, 9)).astype(np.float32)
    affine = affine.copy()
    affine[:3, 3] = [12.0, -7.5, 30.0]
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "i.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "l.nii.gz"))
    state = _state(spacing)
    oracle = _Oracle(state, str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz"))
    assert oracle.classes.shape[1:] != label.shape or spacing != (1.0, 1.0, 1.0)  # the network's grid is another
    back = predict_classes(oracle, state, check_inputs([tmp_path / "i.nii.gz"], ("MRI",)))
    assert back.shape == label.shape and np.array_equal(back, label)


def test_the_model_process_gets_picklable_inputs_and_answers_each_request(tmp_path: Path) -> None:
    """run_items (the service's model process) on checked inputs that crossed a pipe: each request gets the
    mask in label values on its own grid, with its file's affine and header."""
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, (10, 12, 8)).astype(np.uint8)
    affine = np.diag([-1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(size=label.shape).astype(np.float32), affine), str(tmp_path / "i.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "l.nii.gz"))
    state = dataclasses.replace(_state((1.0, 1.0, 1.0)), label_values=(0, 3, 7))
    oracle = _Oracle(state, str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz"))
    inputs = pickle.loads(pickle.dumps(check_inputs([tmp_path / "i.nii.gz"], ("MRI",))))
    loaded = LoadedModel(model=oracle, cfg=None, state=state, domain="segmentation")  # type: ignore[arg-type]
    masks = run_items(loaded, [inputs, inputs])
    assert len(masks) == 2
    for mask in masks:
        assert np.array_equal(mask.mask, np.array([0, 3, 7])[label]) and np.allclose(mask.affine, affine)
        assert mask.volumes_ml == {"a": round(float((label == 1).sum()) * 1.5**3 / 1000, 4),
                                   "b": round(float((label == 2).sum()) * 1.5**3 / 1000, 4)}


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_each_bad_upload_is_refused_with_its_reason(tmp_path: Path) -> None:
    good = _save(tmp_path / "a.nii.gz", np.ones((8, 8, 8), np.float32))
    other = _save(tmp_path / "b.nii.gz", np.ones((8, 8, 8), np.float32))
    cases = [
        ([good], ("flair", "t1ce"), "1 file(s) for a model of 2 channel(s)"),
        ([good, _save(tmp_path / "c.nii.gz", np.ones((8, 8, 9), np.float32))], ("flair", "t1ce"),
         "must share one grid"),
        ([good, _save(tmp_path / "d.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([2.0, 1, 1, 1]))],
         ("flair", "t1ce"), "affine differs"),
        ([_save(tmp_path / "e.nii.gz", np.ones((8, 8), np.float32))], ("MRI",), "each channel must be a 3-D volume"),
        ([_save(tmp_path / "f.nii.gz", np.ones((8, 8, 8, 3), np.float32))], ("flair", "t1ce"), "has 3 channels"),
        ([_save(tmp_path / "g.nii.gz", np.full((8, 8, 8), np.nan, np.float32))], ("MRI",), "NaN or infinite"),
        ([tmp_path / "h.nii.gz"], ("MRI",), "not a NIfTI image"),
        ([], ("MRI",), "no file"),
    ]
    (tmp_path / "h.nii.gz").write_bytes(b"this is not an image")
    for paths, channels, reason in cases:
        with pytest.raises(RequestError, match=re.escape(reason)):
            check_inputs(paths, channels)
    assert check_inputs([good, other], ("flair", "t1ce")).shape == (8, 8, 8)
    four_d = _save(tmp_path / "four.nii.gz", np.ones((8, 8, 8, 2), np.float32))
    assert check_inputs([four_d], ("flair", "t1ce")).paths == [str(four_d)]


def test_the_patch_follows_the_data() -> None:
    from services.segmentation.data import auto_patch

    found = read_collection(str(_needs("msd_task04_hippocampus")))
    assert auto_patch(found.cases, SegmentationConfig()) == (32, 48, 32)
    assert auto_patch(found.cases, SegmentationConfig(patch=(16, 16, 16))) == (16, 16, 16)


def test_an_epoch_of_a_few_cases_revisits_them_to_draw_its_patches(tmp_path: Path) -> None:
    from services.segmentation.data import VolumeDataset, augmentation, case_repeats

    assert case_repeats(2, SegmentationConfig(patches_per_epoch=128)) == 32  # BraTS: 2 cases x 2 patches
    assert case_repeats(146, SegmentationConfig(patches_per_epoch=128)) == 1  # hippocampus: one pass is enough
    assert case_repeats(3, SegmentationConfig()) == 1  # 0: off
    root = write_synthetic(tmp_path, 2, (16, 16, 16), seed=2)
    found = read_collection(str(root))
    cfg = SegmentationConfig(patch=(8, 8, 8), samples_per_case=3, patches_per_epoch=12)
    state = SegmentationState(data="s", fingerprint="f", layout="msd", channels=found.channels,
                              label_values=found.label_values, label_names=found.label_names,
                              regions=regions_for(found, "auto"), spacing=(1.0, 1.0, 1.0), patch=(8, 8, 8),
                              cases={"train": ("a", "b"), "val": (), "test": ()})
    data = VolumeDataset(found.cases, state, augment=augmentation(state, cfg), repeats=case_repeats(2, cfg))
    assert len(data) == 4 and len(data._cache) == 0
    patches = [data[i] for i in range(len(data))]
    assert all(len(p) == 3 and p[0]["image"].shape[1:] == (8, 8, 8) for p in patches)
    assert sorted(data._cache) == [0, 1]  # each case read once, however often it is visited
    with pytest.raises(ValueError, match="only for random patches"):
        VolumeDataset(found.cases, state, repeats=2)  # whole volumes (validation) are never repeated


def test_strong_augmentation_moves_shapes_and_keeps_the_labels_whole() -> None:
    """``augment=strong`` (nnU-Net's kinds: rotation, scaling, noise, blur, brightness, gamma) changes the
    geometry of a patch, which flips and crops alone never do, keeps labels as the input's classes (nearest
    interpolation), keeps the image finite, and draws reproducibly from a seeded state."""
    from services.segmentation.data import augmentation

    side = 16
    image = torch.randn(2, side, side, side)
    label = torch.zeros(1, side, side, side)
    label[0, 4:12, 5:11, 3:13] = 1.0
    label[0, 6:10, 7:9, 6:10] = 2.0
    state = SegmentationState(data="s", fingerprint="f", layout="msd", channels=("a", "b"),
                              label_values=(0, 1, 2), label_names=("bg", "x", "y"),
                              regions={"x": (1,), "y": (2,)}, spacing=(1.0, 1.0, 1.0), patch=(side,) * 3,
                              cases={"train": ("a",), "val": (), "test": ()})
    counts: dict[str, set[int]] = {}
    for kind in ("light", "strong"):
        aug = augmentation(state, SegmentationConfig(augment=kind, samples_per_case=1))
        aug.set_random_state(seed=3)
        counts[kind] = set()
        for _ in range(40):
            (out,) = aug({"image": image.clone(), "label": label.clone()})
            img, lab = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
            assert img.shape == (2, side, side, side) and lab.shape == (1, side, side, side)
            assert torch.isfinite(img).all()
            assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0}
            counts[kind].add(int((lab == 1).sum()))
    assert counts["light"] == {int((label == 1).sum())}  # a whole-volume crop and flips keep every voxel
    assert len(counts["strong"]) > 5  # rotated and scaled patches cover other voxels
    aug = augmentation(state, SegmentationConfig(augment="strong", samples_per_case=1))
    draws = []
    for _ in range(2):
        aug.set_random_state(seed=7)
        draws.append([torch.as_tensor(aug({"image": image.clone(), "label": label.clone()})[0]["image"])
                      for _ in range(5)])
    assert all(torch.equal(a, b) for a, b in zip(*draws, strict=True))
