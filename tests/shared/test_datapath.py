"""Local paths and object-store URIs, the same way: names, existence with reasons, content fingerprints, local
copies and zarr stores, against a real S3-compatible server on loopback (moto's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared import datapath


def test_local_paths_become_absolute_and_uris_stay_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert datapath.normalize("data/ETTh1.csv") == str(tmp_path / "data" / "ETTh1.csv")
    assert datapath.normalize(f"file://{tmp_path}/x.csv") == str(tmp_path / "x.csv")
    assert datapath.normalize("s3://bucket/dir/ETTh1.parquet") == "s3://bucket/dir/ETTh1.parquet"
    assert [datapath.scheme(v) for v in ("s3://b/k", "GS://b/k", "file:///x", "/x", "x.csv")] == [
        "s3", "gs", None, None, None]
    assert (datapath.name("s3://b/d/ETTh1.parquet"), datapath.stem("s3://b/d/ETTh1.parquet"),
            datapath.suffix("/a/b/ETTh1.CSV"), datapath.name("s3://b/replay.zarr/")) == (
        "ETTh1.parquet", "ETTh1", ".csv", "replay.zarr")


def test_a_missing_local_path_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"data {tmp_path}/nope.csv does not exist on this machine"):
        datapath.require(tmp_path / "nope.csv")
    (tmp_path / "here.csv").write_text("a\n1\n")
    datapath.require(tmp_path / "here.csv")


def test_an_unknown_scheme_names_the_package_it_needs() -> None:
    with pytest.raises(ImportError, match="nosuchscheme"):
        datapath.require("nosuchscheme://bucket/key")


def test_s3_objects_read_like_files(s3: str, tmp_path: Path) -> None:
    import s3fs

    local = tmp_path / "series.csv"
    local.write_bytes(b"date,v\n" + b"".join(f"2020-01-01 {h:02d}:00:00,{h}\n".encode() for h in range(24)))
    s3fs.S3FileSystem().put(str(local), f"{s3}/dir/series.csv")
    uri = f"{s3}/dir/series.csv"
    assert datapath.exists(uri) and not datapath.is_dir(uri) and datapath.size(uri) == local.stat().st_size
    assert datapath.fingerprint(uri) == datapath.fingerprint(local)  # the same content, the same signature
    with datapath.open_file(uri) as handle:
        assert handle.read(7) == b"date,v\n"
    copy = datapath.local_copy(uri, cache=tmp_path / "cache")
    assert Path(copy).read_bytes() == local.read_bytes()
    assert datapath.local_copy(uri, cache=tmp_path / "cache") == copy  # kept, not fetched again
    with pytest.raises(FileNotFoundError, match=f"data {s3}/dir/other.csv does not exist$"):
        datapath.require(f"{s3}/dir/other.csv")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here/x.csv"):
        datapath.require("s3://no-such-bucket-here/x.csv")


def test_zarr_stores_open_in_place_from_s3(s3: str, tmp_path: Path) -> None:
    import s3fs
    import xarray as xr

    store = tmp_path / "fields.zarr"
    xr.Dataset({"t2m": (("time", "latitude", "longitude"), np.arange(24.0).reshape(2, 3, 4))}).to_zarr(store)
    s3fs.S3FileSystem().put(str(store), f"{s3}/fields.zarr", recursive=True)
    opened = xr.open_zarr(datapath.mapper(f"{s3}/fields.zarr"))
    assert opened["t2m"].chunks is not None  # lazy: dask chunks, read on demand
    np.testing.assert_array_equal(opened["t2m"].values, np.arange(24.0).reshape(2, 3, 4))
