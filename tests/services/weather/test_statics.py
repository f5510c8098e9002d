"""Static fields beyond the data's own: a file of invariant fields onto the data's grid, and the land fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from services.weather.config import WeatherConfig
from services.weather.data import prepare
from services.weather.grid import Grid
from services.weather.statics import land_fraction, statics_from_file
from services.weather.synthetic import synthetic_dataset

ONE_STEP = {"history": 1, "residual_base": "last", "train_rollout": 1}  # a short record trains


def _grid(lat: np.ndarray, lon: np.ndarray) -> Grid:
    lon2, lat2 = np.meshgrid(lon, lat)
    return Grid(lat2, lon2, True)


def test_a_static_file_is_interpolated_onto_the_grid_with_longitudes_modulo_360(tmp_path: Path) -> None:
    lat = np.arange(60.0, 39.0, -1.0)  # north to south, as ERA5 stores it
    lon = np.arange(0.0, 360.0, 1.0)  # 0-360, where the data's grid is -10..2
    field = lat[:, None] * 10.0 + np.where(lon > 180, lon - 360, lon)[None, :]  # linear in lat and signed lon
    ds = xr.Dataset({"z": (("time", "latitude", "longitude"), field[None].astype(np.float32)),
                     "lsm": (("latitude", "longitude"), (field > 500).astype(np.float32))},
                    coords={"time": [np.datetime64("2019-01-01")], "latitude": lat, "longitude": lon})
    path = tmp_path / "invariant.nc"
    ds.to_netcdf(path)
    grid = _grid(np.array([55.5, 50.25]), np.array([-9.5, -0.5, 0.0, 1.75]))
    found = statics_from_file(str(path), grid)
    assert sorted(found) == ["lsm", "z"] and found["z"].shape == (2, 4) and found["z"].dtype == np.float32
    expected = grid.lat * 10.0 + grid.lon  # across the 0/360 seam too
    np.testing.assert_allclose(found["z"], expected, rtol=0, atol=1e-3)
    past = _grid(np.array([50.0]), np.array([359.5]))  # a global file wraps past its last column
    np.testing.assert_allclose(statics_from_file(str(path), past)["z"], [[500.0 - 0.5]], atol=1e-3)
    with pytest.raises(ValueError, match="does not cover"):
        statics_from_file(str(path), _grid(np.array([70.0]), np.array([0.0])))
    ds[["z"]].isel(latitude=0).to_netcdf(tmp_path / "line.nc")
    with pytest.raises(ValueError, match="static_file .*line.nc: no latitude/longitude grid"):
        statics_from_file(str(tmp_path / "line.nc"), grid)
    xr.concat([ds[["z"]], ds[["z"]]], "time").to_netcdf(tmp_path / "varying.nc")  # two times: not invariant
    with pytest.raises(ValueError, match="no 2-D"):
        statics_from_file(str(tmp_path / "varying.nc"), grid)


def test_the_land_fraction_is_land_over_land_and_sea_over_sea() -> None:
    def at(lat: float, lon: float) -> np.ndarray:  # a 2 x 2 block of 0.25 degree cells
        return land_fraction(_grid(np.array([lat, lat - 0.25]), np.array([lon, lon + 0.25])))

    midlands, atlantic, alps, coast = at(52.5, -1.5), at(50.0, -20.0), at(46.5, 10.0), at(50.25, -5.25)
    assert midlands.shape == (2, 2) and midlands.dtype == np.float32
    assert (midlands == 1.0).all() and (atlantic == 0.0).all() and (alps == 1.0).all()
    assert 0.0 < float(coast.mean()) < 1.0  # Cornwall's coast: a mix


def test_prepare_adds_the_file_fields_and_a_land_fraction_only_where_no_mask_is(tmp_path: Path) -> None:
    ds = synthetic_dataset(days=3, grid=(16, 32), seed=0)
    bare = tmp_path / "bare.nc"
    ds.drop_vars(["lsm", "orography"]).to_netcdf(bare)
    cfg = WeatherConfig(data=str(bare), **ONE_STEP, land_fraction="auto")
    state = prepare(cfg).state
    assert state.static_names == ("land_fraction",) and state.statics["land_fraction"].shape == (16, 32)
    assert prepare(cfg.replace(land_fraction="off")).state.static_names == ()
    invariant = tmp_path / "orography.nc"
    ds[["orography"]].to_netcdf(invariant)
    state = prepare(cfg.replace(static_file=str(invariant))).state
    assert state.static_names == ("orography", "land_fraction")
    np.testing.assert_allclose(state.statics["orography"].numpy(), ds["orography"].values, atol=1e-3)
    with_mask = prepare(WeatherConfig(synthetic_days=3, synthetic_grid=(16, 32), **ONE_STEP,
                                      land_fraction="auto")).state
    assert with_mask.static_names == ("lsm", "orography")  # the data says where the land is
    with pytest.raises(ValueError, match="also static fields of the data"):
        prepare(WeatherConfig(synthetic_days=3, synthetic_grid=(16, 32), **ONE_STEP, static_file=str(invariant)))
