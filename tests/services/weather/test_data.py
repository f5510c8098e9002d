"""The weather reader (netCDF, zarr, GRIB, curvilinear grids), forcings, the synthetic world and the windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.weather.config import WeatherConfig
from services.weather.data import (
    Grid,
    RolloutDataset,
    daily_harmonics,
    fit_climatology,
    forcings,
    load_fields,
    prepare,
    read_fields,
    split_bounds,
    starts,
    synthetic_dataset,
    utc_hours,
    write_synthetic,
)
from tests.conftest import shared_data

WEATHER = "weather"


@pytest.fixture(scope="module")
def world() -> object:
    return synthetic_dataset(days=3, grid=(16, 32), seed=1)


def test_synthetic_world_layout_and_dynamics(world: object) -> None:
    fields = read_fields(world, name="synthetic")  # type: ignore[arg-type]
    assert fields.channels == ["t_850", "t_500", "t2m"] and fields.units == ["K", "K", "K"]
    assert fields.values.shape == (72, 3, 16, 32) and fields.step_hours == 1.0
    assert set(fields.statics) == {"lsm", "orography"} and fields.grid.is_global
    assert np.isfinite(fields.values).all() and 200 < fields.values.mean() < 300
    # it moves: 6-hourly changes are real but smaller than the spatial spread
    change = np.abs(fields.values[6:] - fields.values[:-6]).mean()
    assert 0.05 < change < fields.values.std()
    # land has a larger diurnal cycle than sea (the sun drives the surface)
    land = fields.statics["lsm"] > 0.5
    t2m = fields.values[:, 2]
    daily_range = t2m[24:48].max(axis=0) - t2m[24:48].min(axis=0)
    assert daily_range[land].mean() > daily_range[~land].mean()


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_written_synthetic_data_reads_back_the_same(tmp_path: Path, world: object, suffix: str) -> None:
    path = write_synthetic(tmp_path / f"world{suffix}", days=2, grid=(16, 32), seed=1)
    fields = load_fields(path, levels=(500.0,), variables=("t", "t2m"))
    expected = read_fields(world, levels=(500.0,), variables=("t", "t2m"))  # type: ignore[arg-type]
    assert fields.channels == ["t_500", "t2m"] and fields.sources == [("t", 500.0), ("t2m", None)]
    np.testing.assert_allclose(fields.values, expected.values[:48], rtol=1e-6)


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


def test_forcings_follow_the_sun() -> None:
    lat, lon = np.meshgrid([0.0, 60.0], [0.0, 180.0], indexing="ij")
    grid = Grid(lat, lon)
    noon = forcings(np.array(["2019-03-20T12:00"], dtype="datetime64[ns]"), grid)[0]  # equinox, noon at lon 0
    assert noon.shape == (5, 2, 2)
    assert noon[0, 0, 0] == pytest.approx(1.0, abs=0.02)  # sun overhead at the equator
    assert noon[0, 1, 0] == pytest.approx(0.5, abs=0.02)  # cos(60 deg) at 60 N
    assert noon[0, 0, 1] == 0.0  # midnight on the other side of the globe
    assert noon[1, 0, 0] == pytest.approx(0.0, abs=1e-5) and noon[2, 0, 0] == pytest.approx(-1.0, abs=1e-5)


def test_grid_weights_and_global_detection() -> None:
    lon, lat = np.meshgrid(np.arange(0, 360, 90.0), [60.0, 0.0, -60.0])
    grid = Grid(lat, lon)
    w = grid.weights()
    assert w.mean() == pytest.approx(1.0) and w[1, 0] == pytest.approx(2 * w[0, 0])
    assert grid.is_global
    assert not Grid(lat[:, :2], lon[:, :2]).is_global
    assert Grid.from_info(grid.to_info()).lat.tolist() == grid.lat.tolist()


def test_splits_are_contiguous_in_time_and_windows_stay_inside() -> None:
    bounds = split_bounds(100, 0.2, 0.2)
    assert bounds == [(0, 60), (60, 80), (80, 100)]
    idx = starts((60, 80), offset=6, history=2, span=2, every=1)
    assert idx[0] == 66 and idx[-1] + 12 <= 79
    assert len(starts((0, 10), offset=6, history=1, span=2, every=1)) == 0


def test_rollout_window_aligns_history_forcings_and_targets() -> None:
    states = np.arange(30, dtype=np.float32)[:, None, None, None] * np.ones((30, 1, 2, 3), np.float32)
    force = np.arange(30, dtype=np.float32)[:, None, None, None] * np.ones((30, 5, 2, 3), np.float32)
    hours = np.arange(30, dtype=np.float64) % 24
    ds = RolloutDataset(states, force, np.array([10]), offset=3, history=2, rollout=2, hours=hours)
    hist, f, target, hour = ds[0]
    assert hist[:, 0, 0, 0].tolist() == [7.0, 10.0]
    assert f[:, 0, 0, 0].tolist() == [10.0, 13.0, 16.0]
    assert target[:, 0, 0, 0].tolist() == [13.0, 16.0]
    assert float(hour) == 10.0  # the hour of the day of the last history state
    assert isinstance(hist, torch.Tensor)


@pytest.mark.parametrize("every", [1, 6])
def test_climatology_recovers_a_daily_cycle_from_hourly_or_six_hourly_data(every: int) -> None:
    times = np.datetime64("2019-03-01T00") + np.arange(0, 24 * 10, every).astype("timedelta64[h]")
    hours = utc_hours(times)
    assert hours[:3].tolist() == [0.0, float(every), float(2 * every)]
    rng = np.random.default_rng(0)
    mean, amp, amp2 = (rng.normal(size=(2, 3, 4)) for _ in range(3))
    phase = 2 * np.pi * hours[:, None, None, None] / 24
    values = mean + amp * np.cos(phase) + amp2 * np.cos(2 * phase)  # (T, 2, 3, 4)
    coef = fit_climatology(values, times, harmonics=2)
    assert coef.shape == (5, 2, 3, 4)
    assert np.allclose(coef[0], mean, atol=1e-5) and np.allclose(coef[1], amp, atol=1e-5)
    assert np.allclose(coef[3], amp2, atol=1e-5)
    assert np.abs(coef[[2, 4]]).max() < 1e-5  # no sine terms in this cycle (at 6 h, sin 2 is never sampled)
    fitted = np.einsum("tj,jchw->tchw", daily_harmonics(hours, 2), coef)
    assert np.allclose(fitted, values, atol=1e-5)


def test_prepare_normalizes_with_training_statistics_only(tmp_path: Path) -> None:
    cfg = WeatherConfig(synthetic_days=4, synthetic_grid=(16, 32), train_rollout=2)
    prepared = prepare(cfg)
    a, b = prepared.bounds[0]
    train = prepared.normalized[a:b]
    assert np.abs(train.mean(axis=(0, 2, 3))).max() < 1e-3
    assert np.abs(train.std(axis=(0, 2, 3)) - 1).max() < 1e-3
    info = prepared.info
    assert info["channels"] == ["t_850", "t_500", "t2m"] and info["static_names"] == ["lsm", "orography"]
    assert info["periods"]["train"][0] == "2000-01-01T00" and prepared.offset == 6
    clim = np.asarray(info["climatology"])  # the training period's daily cycle, 2 harmonics, normalized
    assert clim.shape == (5, 3, 16, 32) and np.abs(clim[0].mean(axis=(1, 2))).max() < 0.05
    twelve_hourly = tmp_path / "twelve_hourly.nc"
    synthetic_dataset(days=2, grid=(16, 32), seed=0).isel(time=slice(0, None, 12)).to_netcdf(twelve_hourly)
    with pytest.raises(ValueError, match="not a multiple of the data's time step \\(12 h\\)"):
        prepare(cfg, data=str(twelve_hourly))


# --- the real files in ../shared/data/weather -----------------------------------------------------------------

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
