"""The weather readers: netCDF, zarr and GRIB files (ERA5 and CREDIT layouts, curvilinear grids) into Fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.weather.readers import load_fields, read_fields
from services.weather.synthetic import synthetic_dataset, write_synthetic
from tests.conftest import shared_data

WEATHER = "weather"


@pytest.fixture(scope="module")
def world() -> object:
    return synthetic_dataset(days=3, grid=(16, 32), seed=1)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_written_synthetic_data_reads_back_the_same(tmp_path: Path, world: object, suffix: str) -> None:
    from services.weather.readers import open_dataset

    path = write_synthetic(tmp_path / f"world{suffix}", days=2, grid=(16, 32), seed=1)
    with open_dataset(path) as ds:
        assert ds["t"].chunks is not None  # lazy (dask) for netCDF and zarr alike
    fields = load_fields(path, levels=(500.0,), variables=("t", "t2m"))
    expected = read_fields(world, levels=(500.0,), variables=("t", "t2m"))  # type: ignore[arg-type]
    assert fields.channels == ["t_500", "t2m"] and fields.sources == [("t", 500.0), ("t2m", None)]
    np.testing.assert_allclose(fields.values, expected.values[:48], rtol=1e-6)


def _corrupt(files: list[Path]) -> None:
    assert files
    for chunk in files:
        chunk.write_bytes(b"not a zarr chunk")


def test_a_zarr_store_is_read_lazily_chunk_by_chunk(tmp_path: Path, world: object) -> None:
    """Only the chunks of the chosen variable and level are read: every other chunk is corrupted here, and the
    reader never notices (while asking for one of them fails)."""
    import xarray as xr

    from services.weather.readers import open_dataset

    path = tmp_path / "world.zarr"
    world.chunk({"time": 12, "level": 1}).to_zarr(path)  # type: ignore[attr-defined]
    with open_dataset(path) as ds:
        assert ds["t"].chunks == ((12,) * 6, (1, 1), (16,), (32,))  # dask arrays: nothing read yet
    levels = [float(v) for v in xr.open_zarr(path)["level"].values]
    _corrupt([f for f in (path / "t" / "c").rglob("*") if f.is_file() and f.relative_to(path / "t" / "c").parts[1]
              == str(levels.index(850.0))])
    _corrupt([f for f in (path / "t2m" / "c").rglob("*") if f.is_file()])
    fields = load_fields(path, variables=("t",), levels=(500.0,))
    expected = read_fields(world, variables=("t",), levels=(500.0,))  # type: ignore[arg-type]
    assert fields.channels == ["t_500"]
    np.testing.assert_allclose(fields.values, expected.values, rtol=1e-6)
    with pytest.raises(RuntimeError, match="decompression error"):  # the corrupted chunks are really there
        load_fields(path, variables=("t2m",))


def test_a_zarr_store_in_an_object_store_reads_in_place(s3: str, tmp_path: Path, world: object) -> None:
    import s3fs

    path = write_synthetic(tmp_path / "world.zarr", days=2, grid=(16, 32), seed=1)
    s3fs.S3FileSystem().put(str(path), f"{s3}/weather/world.zarr", recursive=True)
    remote = load_fields(f"{s3}/weather/world.zarr", levels=(500.0,), variables=("t", "t2m"))
    local = load_fields(path, levels=(500.0,), variables=("t", "t2m"))
    assert remote.name == "world.zarr" and remote.channels == local.channels
    np.testing.assert_array_equal(remote.values, local.values)
    assert remote.fingerprint == local.fingerprint


def test_reader_errors_name_the_problem(world: object) -> None:
    with pytest.raises(ValueError, match="variables \\['q'\\] not found"):
        read_fields(world, variables=("q",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="levels \\[700.0\\] not in"):
        read_fields(world, levels=(700.0,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no 'time' dimension"):
        read_fields(world.isel(time=0))  # type: ignore[attr-defined]
    gappy = world.isel(time=[0, 1, 3])  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not regular"):
        read_fields(gappy)
    holes = world.copy(deep=True)  # type: ignore[attr-defined]
    holes["t2m"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        read_fields(holes)
    with pytest.raises(FileNotFoundError):
        load_fields("/nonexistent/era5.grib")


@pytest.mark.data
def test_era5_uk_grib_reads_hourly_2m_temperature_without_writing_an_index() -> None:
    path = shared_data(WEATHER, "era5-2mt-2019-03-uk.grib")
    before = set(path.parent.iterdir())
    fields = load_fields(path)
    assert fields.channels == ["t2m"] and fields.units == ["K"]
    assert fields.values.shape == (744, 1, 33, 49) and fields.step_hours == 1.0
    assert not fields.grid.is_global and fields.grid.lat[0, 0] == 58.0 and fields.grid.lon[0, 0] == -10.0
    assert 260 < fields.values.mean() < 290
    assert set(path.parent.iterdir()) == before


@pytest.mark.data
def test_era5_levels_members_grib_selects_a_member_and_levels() -> None:
    path = shared_data(WEATHER, "era5-levels-members.grib")
    fields = load_fields(path, variables=("t",), levels=(500.0,), member=3)
    assert fields.channels == ["t_500"] and fields.values.shape == (4, 1, 61, 120)
    assert fields.grid.is_global and fields.step_hours == 12.0
    other = load_fields(path, variables=("t",), levels=(500.0,), member=0)
    assert not np.allclose(fields.values, other.values)
    with pytest.raises(ValueError, match="10 ensemble members"):
        load_fields(path, member=10)


@pytest.mark.data
@pytest.mark.parametrize(("name", "channels"), [("credit_era5.3d.198001.nc", 5), ("credit_era5.2d.198001.nc", 6)])
def test_credit_files_on_a_curvilinear_grid(name: str, channels: int) -> None:
    path = shared_data(WEATHER, name)
    fields = load_fields(path, levels=(500.0, 850.0) if "3d" in name else ())
    assert fields.values.shape[1] == channels * (2 if "3d" in name else 1)
    assert fields.values.shape[0] == 25 and fields.values.shape[2:] == (4, 5)
    assert not fields.grid.regular and 35 < fields.grid.lat.mean() < 36.5
    assert fields.grid.lon.min() < -100


@pytest.mark.data
@pytest.mark.parametrize(("name", "reason"), [("eraint_uvz.nc", "no 'time' dimension"),
                                              ("daily_surface_cancities_1990-1993.nc", "no latitude/longitude grid")])


def test_files_that_are_not_forecastable_grids_are_refused_clearly(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        load_fields(shared_data(WEATHER, name))
