"""A synthetic global atmosphere in the ERA5 layout, with known structure: what the weather domain trains on
when no data is given (demo, tests, a fresh machine)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .forcings import forcings
from .grid import Grid

if TYPE_CHECKING:
    import xarray as xr


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], passes: int = 6) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    field_ = rng.standard_normal(shape)
    for _ in range(passes):
        field_ = uniform_filter(field_, size=3, mode=("nearest", "wrap"))
    return (field_ - field_.mean()) / (field_.std() + 1e-9)


def synthetic_dataset(days: int = 60, grid: tuple[int, int] = (32, 64), seed: int = 0,
                      start: str = "2000-01-01") -> xr.Dataset:
    """An hourly global world in the ERA5 layout: temperature ``t`` at 850 and 500 hPa and 2 m temperature
    ``t2m``, advected by westerlies plus travelling planetary waves (semi-Lagrangian), diffused, relaxed
    towards a radiative equilibrium that follows the sun (land heats and cools faster than sea), with the
    surface coupled to 850 hPa. Static fields: land-sea mask ``lsm`` and ``orography``."""
    import xarray as xr
    from scipy.ndimage import laplace, map_coordinates

    rng = np.random.default_rng(seed)
    n_lat, n_lon = grid
    dlat, dlon = 180.0 / n_lat, 360.0 / n_lon
    lat = 90.0 - dlat / 2 - dlat * np.arange(n_lat)
    lon = dlon * np.arange(n_lon)
    lon2, lat2 = np.meshgrid(lon, lat)
    phi = np.deg2rad(lat2)
    land = (_smooth_noise(rng, grid, 8) > 0.35).astype(np.float32)
    orography = (np.maximum(_smooth_noise(rng, grid, 4), 0) * 1500.0 * land).astype(np.float32)
    g = Grid(lat2, lon2, True)
    steps = days * 24
    times = np.datetime64(start, "ns") + np.arange(steps) * np.timedelta64(1, "h")
    sun = forcings(times, g)[:, 0]  # (T, H, W) cos zenith

    levels = {"t_850": (270.0, 35.0, 12.0), "t_500": (245.0, 30.0, 25.0)}  # mean, pole-equator contrast, jet m/s
    state = {k: m + d * (np.cos(phi) ** 2 - 0.5) + 4.0 * _smooth_noise(rng, grid) for k, (m, d, _) in levels.items()}
    state["t2m"] = state["t_850"] + 8.0 - 0.0065 * orography
    waves = [(int(k), rng.uniform(8, 16), rng.uniform(-1.0, 1.0) * 2 * math.pi / (24 * 4), rng.uniform(0, 2 * math.pi))
             for k in rng.choice([2, 3, 4, 5], size=3, replace=False)]  # (wavenumber, amplitude m/s, rad/h, phase)
    out = {k: np.empty((steps, n_lat, n_lon), np.float32) for k in ("t2m", "t_850", "t_500")}
    rows, cols = np.meshgrid(np.arange(n_lat, dtype=np.float64), np.arange(n_lon, dtype=np.float64), indexing="ij")
    metres_per_deg = 111_000.0
    for i in range(steps):
        hours = float(i)
        for key, (mean, contrast, jet) in levels.items():
            u = jet * np.cos(phi) ** 2  # westerlies, m/s
            v = np.zeros_like(u)
            for k, amp, omega, phase in waves:
                arg = k * np.deg2rad(lon2) - omega * hours + phase
                u = u + amp * np.cos(phi) ** 2 * np.sin(arg) * (1.0 if key == "t_500" else 0.6)
                v = v + amp * np.cos(phi) * np.cos(arg) * (1.0 if key == "t_500" else 0.6)
            dx = u * 3600.0 / (metres_per_deg * np.maximum(np.cos(phi), 0.05)) / dlon  # grid cells per hour
            dy = -v * 3600.0 / metres_per_deg / dlat  # rows run north to south
            field_ = map_coordinates(state[key], [np.clip(rows - dy, 0, n_lat - 1), (cols - dx) % n_lon],
                                     order=1, mode="grid-wrap")
            equilibrium = mean + contrast * (np.cos(phi) ** 2 - 0.5)
            field_ = field_ + 0.02 * laplace(field_, mode="wrap") + (equilibrium - field_) / (24.0 * 10)
            state[key] = field_
        heating = (6.0 * land + 1.5) * (sun[i] - 0.3)  # K per day scale of the diurnal cycle
        surface = state["t2m"] + heating / 8.0 + (state["t_850"] + 8.0 - 0.0065 * orography - state["t2m"]) / 12.0
        state["t2m"] = surface + 0.02 * laplace(surface, mode="wrap")
        for key in out:
            out[key][i] = state[key]
    level_t = np.stack([out["t_850"], out["t_500"]], axis=1)
    return xr.Dataset(
        {"t": (("time", "level", "latitude", "longitude"), level_t, {"units": "K", "long_name": "temperature"}),
         "t2m": (("time", "latitude", "longitude"), out["t2m"], {"units": "K", "long_name": "2 metre temperature"}),
         "lsm": (("latitude", "longitude"), land, {"units": "1", "long_name": "land-sea mask"}),
         "orography": (("latitude", "longitude"), orography, {"units": "m"})},
        coords={"time": times, "level": ("level", np.array([850.0, 500.0]), {"units": "hPa"}),
                "latitude": ("latitude", lat, {"units": "degrees_north"}),
                "longitude": ("longitude", lon, {"units": "degrees_east"})},
        attrs={"title": "Tessera synthetic advection-diffusion world", "seed": seed})


def write_synthetic(path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`synthetic_dataset` as netCDF (``.nc``) or zarr (``.zarr``)."""
    path = Path(path)
    ds = synthetic_dataset(**kwargs)
    if path.suffix == ".zarr":
        ds.to_zarr(path, mode="w")
    else:
        ds.to_netcdf(path)
    return path
