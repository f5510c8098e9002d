"""Segmenting NIfTI volumes with a loaded model: checks, preprocessing, sliding windows, and the way back.

A prediction is made on the network's grid (RAS, the model's spacing) and brought back to the input's own grid
with MONAI's ``Invertd`` (the inverse of the preprocessing's reorientation and resampling, nearest neighbour),
then saved with the input's affine and header: the mask lies voxel for voxel on the input. The service, the
evaluation, the pyfunc model and ``tessera predict`` share these functions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import RequestError

from .data import SegmentationState, preprocessing

MAX_VOXELS = 320 * 320 * 240  # per channel; larger volumes get a 413


@dataclass
class Inputs:
    """Checked input channels: file paths in the model's channel order (or one 4-D file), and the grid of the
    first one, which the mask takes (what the service hands its model process: the files are read there)."""

    paths: list[str]
    affine: np.ndarray
    header: Any  # the first file's nibabel header: the mask's, with its own data type
    shape: tuple[int, int, int]


def _load(path: Path, index: int) -> Any:
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))
        image.header.get_data_shape()
    except Exception as exc:
        raise RequestError(f"file {index} ({path.name}): not a NIfTI image ({type(exc).__name__}: {exc})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise RequestError(f"file {index} ({path.name}): a {type(image).__name__}, not NIfTI")
    return image


def check_inputs(paths: Sequence[Path], channels: Sequence[str]) -> Inputs:
    """The uploaded channels, or a RequestError saying what does not fit the model."""
    n = len(channels)
    if not paths:
        raise RequestError(f"no file: send {n} NIfTI file(s), one per channel {list(channels)}, or one 4-D file")
    images = [_load(Path(p), i) for i, p in enumerate(paths)]
    shapes = [tuple(int(s) for s in im.shape) for im in images]
    if len(images) == 1 and len(shapes[0]) == 4:
        if shapes[0][3] != n:
            raise RequestError(f"the 4-D image has {shapes[0][3]} channels; the model takes {n} {list(channels)}")
        spatial: tuple[int, ...] = shapes[0][:3]
    else:
        if len(images) != n:
            raise RequestError(f"{len(images)} file(s) for a model of {n} channel(s) {list(channels)} (or send one "
                               f"4-D file)")
        for i, shape in enumerate(shapes):
            if len(shape) != 3:
                raise RequestError(f"file {i} ({Path(paths[i]).name}): a {len(shape)}-D image of shape {list(shape)}; "
                                   f"each channel must be a 3-D volume")
            if shape != shapes[0]:
                raise RequestError(f"file {i} has shape {list(shape)}, file 0 {list(shapes[0])}: channels must share "
                                   f"one grid")
            if not np.allclose(images[i].affine, images[0].affine, atol=1e-4):
                raise RequestError(f"file {i}'s affine differs from file 0's: channels must share one grid")
        spatial = shapes[0]
    if min(spatial) < 1:
        raise RequestError(f"an empty volume of shape {list(spatial)}")
    voxels = int(np.prod(spatial))
    if voxels > MAX_VOXELS:
        raise RequestError(f"{voxels:,} voxels per channel; at most {MAX_VOXELS:,}", status=413)
    for i, image in enumerate(images):
        data = np.asanyarray(image.dataobj)
        if not np.issubdtype(data.dtype, np.number):
            raise RequestError(f"file {i}: voxels of type {data.dtype}, not numbers")
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise RequestError(f"file {i} ({Path(paths[i]).name}): NaN or infinite voxels")
    return Inputs([str(p) for p in paths], np.asarray(images[0].affine), images[0].header,
                  (int(spatial[0]), int(spatial[1]), int(spatial[2])))


@dataclass
class Mask:
    mask: np.ndarray  # (X, Y, Z) label values on the input's grid
    affine: np.ndarray
    header: Any
    volumes_ml: dict[str, float]  # label name -> volume

    def nifti(self) -> Any:
        import nibabel as nib

        header = self.header.copy()
        header.set_data_dtype(np.uint8 if self.mask.max(initial=0) < 256 else np.int16)
        header.set_slope_inter(1.0, 0.0)
        return nib.Nifti1Image(self.mask.astype(header.get_data_dtype()), self.affine, header)

    def nifti_bytes(self) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mask.nii.gz"
            self.nifti().to_filename(str(path))
            return path.read_bytes()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict_classes(model: Any, state: SegmentationState, inputs: Inputs) -> np.ndarray:
    """Class indices (X, Y, Z) on the input's grid."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    pre = preprocessing(state, with_label=False)
    data = pre({"image": inputs.paths if len(inputs.paths) > 1 else inputs.paths[0]})
    image = data["image"]
    probabilities = model.segment(image.as_tensor()[None].float().to(_device(model)))  # (1, K, ...)
    classes = probabilities.argmax(1).to(torch.uint8).cpu()  # (1, X', Y', Z'): canonical grid
    data["pred"] = MetaTensor(classes.float(), meta=image.meta, applied_operations=image.applied_operations)
    back = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    out = np.rint(np.asarray(back.detach().cpu())[0]).astype(np.int64)
    if out.shape != inputs.shape:
        raise RuntimeError(f"the inverted prediction has shape {out.shape}, the input {inputs.shape}")
    return out


def segment(loaded: Any, inputs: Inputs) -> Mask:
    state: SegmentationState = loaded.state
    classes = predict_classes(loaded.model.eval(), state, inputs)
    values = np.asarray(state.label_values, dtype=np.int64)
    mask = values[classes]
    volumes = label_volumes(mask, inputs.header.get_zooms(), state.label_values, state.label_names)
    return Mask(mask, inputs.affine, inputs.header, volumes)


def run_items(loaded: Any, items: list[Inputs]) -> list[Mask]:
    """The service's batch (in its model process): each request's mask, one after the other. Volumes do not
    batch well on a CPU (the demo's model: 29 ms for one 32^3 window, 42 ms each for two or four); one torch
    thread in a process of its own spends less CPU per answer than requests on the service's threads did (62
    against 89 ms under the load benchmark, 8 Dec 2026)."""
    return [segment(loaded, inputs) for inputs in items]


def label_volumes(mask: np.ndarray, zooms: Sequence[float], values: Sequence[int],
                  names: Sequence[str]) -> dict[str, float]:
    """Label name -> volume in mL of a mask of label values with voxel sizes ``zooms`` (mm; background left
    out)."""
    voxel_ml = float(np.prod(np.abs(np.asarray(zooms[:3], dtype=np.float64)))) / 1000.0
    return {name: round(float((mask == v).sum()) * voxel_ml, 4)
            for v, name in zip(values, names, strict=True) if v != 0}
