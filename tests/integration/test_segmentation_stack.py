"""segmentation on the real local stack: the Ray training job, ``POST /segment`` with NIfTI in and a mask on the
input's own grid out, the JSON forms, every bad upload a 4xx with its reason, and the evaluation as a Ray job."""

from __future__ import annotations

import gzip
import io
import socket
from pathlib import Path
from urllib.parse import urlparse

import httpx
import nibabel as nib
import numpy as np
import pytest

from services.segmentation.data import write_synthetic
from shared import registry
from tests.integration.conftest import submit_job, url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _url(route: str | None = None) -> str:
    return url("segmentation", route)


@pytest.fixture(scope="module")
def segmenter(trained: object) -> dict:
    return trained("segmentation")  # type: ignore[operator,no-any-return]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic case like the training data, stored LPS at 1.2 mm with an origin (not the network's grid)."""
    root = write_synthetic(tmp_path_factory.mktemp("seg"), 1, (28, 24, 20), seed=11)
    return root / "imagesTr" / "synthetic_000.nii.gz"


def _upload(*paths: Path, **data: str) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "application/gzip")) for p in paths]
    return httpx.post(_url(), files=files, data=data, timeout=120)


def _image(content: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(content))


def test_the_mask_comes_back_on_the_inputs_grid_affine_and_header(segmenter: dict, volume: Path) -> None:
    answer = _upload(volume)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-version"] == str(segmenter["version"])
    mask, source = _image(answer.content), nib.load(str(volume))
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S") and mask.header.get_zooms() == source.header.get_zooms()
    values = np.asarray(mask.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2}


def test_format_json_gives_the_label_volumes(segmenter: dict, volume: Path) -> None:
    answer = _upload(volume, format="json")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body["volumes_ml"]) == {"body", "blob"} and all(v >= 0 for v in body["volumes_ml"].values())
    assert body["shape"] == [28, 24, 20] and body["model"]["version"] == str(segmenter["version"])
    mask = np.asarray(_image(_upload(volume).content).dataobj)
    voxel_ml = 1.2**3 / 1000
    assert body["volumes_ml"]["body"] == pytest.approx((mask == 1).sum() * voxel_ml, abs=1e-3)


def test_the_json_route_answers_its_swagger_example(segmenter: dict) -> None:
    example = registry.get("segmentation").example_request()
    answer = httpx.post(_url("/segment_json"), json={**example, "include_mask": True}, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["shape"] == [16, 16, 16] and np.asarray(body["mask"]).shape == (16, 16, 16)
    info = httpx.get(_url("/model"), timeout=30).json()
    assert info["channels"] == ["MRI"] and info["orientation"] == "RAS" and info["patch"] == [16, 16, 16]


def _nifti(tmp: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = tmp / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_each_bad_upload_is_a_4xx_with_its_reason(segmenter: dict, volume: Path, tmp_path: Path) -> None:
    ones = np.ones((16, 16, 16), np.float32)
    not_nifti = tmp_path / "notes.nii.gz"
    not_nifti.write_bytes(b"not an image at all")
    cases = [
        ((volume, volume), 422, "2 file(s) for a model of 1 channel(s)"),
        ((_nifti(tmp_path, "flat.nii.gz", np.ones((16, 16), np.float32)),), 422, "must be a 3-D volume"),
        ((_nifti(tmp_path, "nan.nii.gz", np.full((16, 16, 16), np.nan, np.float32)),), 422, "NaN or infinite"),
        ((not_nifti,), 422, "not a NIfTI image"),
        ((_nifti(tmp_path, "four.nii.gz", np.stack([ones, ones], -1)),), 422, "the 4-D image has 2 channels"),
    ]
    for paths, status, reason in cases:
        answer = _upload(*paths)
        assert answer.status_code == status and reason in answer.json()["error"], answer.text
    bad_json = httpx.post(_url("/segment_json"), json={"channels": {"T2": [[[1.0]]]}}, timeout=60)
    assert bad_json.status_code == 422 and "missing ['MRI']" in bad_json.json()["error"]
    ragged = httpx.post(_url("/segment_json"), json={"channels": {"MRI": [[[1.0, 2.0], [1.0]]]}}, timeout=60)
    assert ragged.status_code == 422 and "not a rectangular" in ragged.json()["error"]
    no_file = httpx.post(_url(), data={"format": "json"}, files={"other": ("x.txt", b"x")}, timeout=60)
    assert 400 <= no_file.status_code < 500


def test_an_upload_over_the_size_limit_is_refused_before_it_is_read(segmenter: dict) -> None:
    target = urlparse(_url())
    with socket.create_connection((target.hostname, target.port), timeout=30) as conn:
        conn.sendall(f"POST {target.path} HTTP/1.1\r\nHost: {target.hostname}\r\nContent-Type: multipart/form-data; "
                     f"boundary=x\r\nContent-Length: {300 * 1024 * 1024}\r\n\r\n".encode())
        reply = io.BytesIO(conn.recv(4096)).readline()
    assert b" 413 " in reply, reply


def test_the_evaluation_job_scores_dice_and_hd95_per_region(segmenter: dict) -> None:
    code, result = submit_job("pipelines.evaluate", "segmentation", None, [])
    assert code == 0 and result is not None
    assert set(result["dice"]) == set(result["hd95"]) == {"body", "blob"}
    assert result["n_cases"] == len(result["per_case"]) >= 1 and result["version"] == segmenter["version"]
    assert all(0.0 <= d <= 1.0 for d in result["dice"].values() if d is not None)
