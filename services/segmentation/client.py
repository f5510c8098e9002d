"""Client side of the segmentation service (NIfTI in, NIfTI mask out), the JSON example and the pyfunc model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from shared.registry import Prediction

EXAMPLE_SHAPE = (16, 16, 16)


def _synthetic_volume(shape: tuple[int, int, int] = EXAMPLE_SHAPE, seed: int = 3) -> np.ndarray:
    """One synthetic MR-like volume (the training data's generator, no files written)."""
    from .data import synthetic_case

    return synthetic_case(shape, np.random.default_rng(seed))[0]


def example_request() -> dict[str, Any]:
    """A ``POST /segment_json`` body: a 16^3 synthetic volume in the channel of the synthetic data ("MRI")."""
    volume = np.round(_synthetic_volume(), 3)
    return {"channels": {"MRI": volume.tolist()}, "spacing": [1.0, 1.0, 1.0], "include_mask": False}


def write_channels(folder: Path, volumes: dict[str, np.ndarray], order: list[str], spacing: list[float]) -> list[Path]:
    """One NIfTI per channel in ``order`` on an RAS grid of ``spacing`` (what the JSON route and pyfunc send
    through the file path)."""
    import nibabel as nib

    affine = np.diag([*[float(s) for s in spacing], 1.0])
    paths = []
    for i, name in enumerate(order):
        path = folder / f"channel{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(volumes[name], dtype=np.float32), affine), str(path))
        paths.append(path)
    return paths


def example_input(folder: Path, data: str | None = None) -> Path:
    """A NIfTI file for ``tessera predict segmentation``: the first case of ``data`` (its channels stacked into
    one 4-D file when there are several), or a synthetic volume."""
    import nibabel as nib

    path = folder / "segmentation-input.nii.gz"
    if data:
        from .data import load_nifti, read_collection

        case = read_collection(data).cases[0]
        images = [load_nifti(p) for p in case.images]
        if len(images) == 1:
            nib.save(images[0], str(path))
        else:
            stacked = np.stack([np.asarray(im.dataobj, dtype=np.float32) for im in images], axis=-1)
            nib.save(nib.Nifti1Image(stacked, images[0].affine, images[0].header), str(path))
        return path
    nib.save(nib.Nifti1Image(_synthetic_volume((32, 32, 32)), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    return path


def predict_file(url: str, path: Path, *, output: Path | None = None, timeout: float = 120.0) -> Prediction:
    """Upload a NIfTI (one 4-D file, or a 3-D one for a one-channel model); the mask written to ``output``
    (default: beside the input), its label volumes as a table (one segmentation: the volumes are counted here,
    from the mask and the label names of ``/model``)."""
    import gzip

    import httpx
    import nibabel as nib

    from shared.client import check

    from .inference import label_volumes

    with path.open("rb") as handle:
        answer = check(httpx.post(url, files=[("files", (path.name, handle, "application/gzip"))], timeout=timeout))
    info = check(httpx.get(f"{url.rsplit('/', 1)[0]}/model", timeout=30)).json()
    target = output or path.with_name(path.name.replace(".nii", "_mask.nii"))
    target.write_bytes(answer.content)
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    labels = {int(v): name for v, name in info["labels"].items()}
    volumes = label_volumes(np.asarray(mask.dataobj), mask.header.get_zooms(), list(labels), list(labels.values()))
    version = answer.headers.get("x-model-version", str(info.get("version")))
    table = Table(title=f"POST {url} -> {info.get('architecture')} v{version}: mask in {target}")
    table.add_column("label")
    table.add_column("volume (mL)", justify="right")
    for name, ml in volumes.items():
        table.add_row(name, f"{ml:.3f}")
    return Prediction(version=str(version), summary=table, output=target)


# --- the MLflow pyfunc model: {"image": (C, X, Y, Z) array on an RAS grid of the model's spacing} -> mask -----

def pyfunc_example(loaded: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    volume = _synthetic_volume()
    channels = len(loaded.state.channels)
    return {"image": np.stack([volume] * channels).astype(np.float32)}, {}


def pyfunc_predict(loaded: Any, model_input: Any, params: dict[str, Any]) -> np.ndarray:
    """The mask (X, Y, Z) of label values for ``image`` (C, X, Y, Z), taken to lie on an RAS grid with the
    model's voxel spacing."""
    from shared.serving import RequestError

    from .inference import check_inputs, segment

    if not isinstance(model_input, dict) or "image" not in model_input:
        raise ValueError("the segmentation model takes {'image': (channels, X, Y, Z) array}")
    image = np.asarray(model_input["image"], dtype=np.float32)
    channels = list(loaded.state.channels)
    if image.ndim != 4 or image.shape[0] != len(channels):
        raise ValueError(f"image has shape {list(image.shape)}; the model takes ({len(channels)}, X, Y, Z) for "
                         f"channels {channels}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_channels(Path(tmp), dict(zip(channels, image, strict=True)), channels,
                               list(loaded.state.spacing))
        try:
            found = segment(loaded, check_inputs(paths, channels))
        except RequestError as exc:
            raise ValueError(str(exc)) from None
    return found.mask.astype(np.int64)
