"""The grid of gridded weather data: latitude and longitude of every point, regular or curvilinear."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    import xarray as xr

LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")


@dataclass
class Grid:
    """Latitude and longitude (degrees) of every grid point, (H, W); ``regular`` when both come from 1-D axes."""

    lat: np.ndarray
    lon: np.ndarray
    regular: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lat.shape[0]), int(self.lat.shape[1])

    @property
    def is_global(self) -> bool:
        """A regular grid spanning every longitude (circular in longitude, with poles at the edges)."""
        if not self.regular or self.shape[1] < 4:
            return False
        lon = self.lon[0]
        step = np.diff(lon)
        return bool(np.allclose(step, step[0], atol=1e-4) and abs(abs(step[0]) * len(lon) - 360.0) < 1e-3)

    def weights(self) -> np.ndarray:
        """Latitude weights ∝ cos(lat) (cell area), normalized to mean 1 (WeatherBench)."""
        w = np.cos(np.deg2rad(self.lat)).clip(min=0.0)
        if float(w.mean()) <= 0:
            return np.ones_like(w)
        return (w / w.mean()).astype(np.float32)

    def axes(self) -> tuple[Tensor, Tensor]:
        """(latitude, longitude) as saved: the 1-D axes of a regular grid, else the (H, W) arrays (float64)."""
        if self.regular:
            return torch.from_numpy(self.lat[:, 0].copy()), torch.from_numpy(self.lon[0].copy())
        return torch.from_numpy(self.lat.copy()), torch.from_numpy(self.lon.copy())

    @classmethod
    def from_axes(cls, latitude: Tensor | np.ndarray, longitude: Tensor | np.ndarray, regular: bool) -> Grid:
        """The grid of :meth:`axes`."""
        lat = np.asarray(latitude, np.float64)
        lon = np.asarray(longitude, np.float64)
        if regular:
            lon2, lat2 = np.meshgrid(lon, lat)
            return cls(lat2, lon2, True)
        return cls(lat, lon, False)


def spatial(ds: xr.Dataset) -> tuple[str, str, np.ndarray, np.ndarray, bool]:
    """Names of the (Y, X) dims and the 2-D latitude/longitude of the grid."""
    if "latitude" in ds.dims and "longitude" in ds.dims:
        lon2, lat2 = np.meshgrid(ds["longitude"].values.astype(np.float64), ds["latitude"].values.astype(np.float64))
        return "latitude", "longitude", lat2, lon2, True
    lat_name = next((n for n in LAT_NAMES if n in ds.variables and ds[n].ndim == 2), None)
    lon_name = next((n for n in LON_NAMES if n in ds.variables and ds[n].ndim == 2), None)
    if lat_name is None or lon_name is None:
        raise ValueError("no latitude/longitude grid: expected 'latitude' and 'longitude' dimensions (ERA5 layout) or "
                         "2-D 'lat'/'lon' coordinates on (y, x)")
    y, x = ds[lat_name].dims
    lat2 = ds[lat_name].transpose(y, x).values.astype(np.float64)
    lon2 = ds[lon_name].transpose(y, x).values.astype(np.float64)
    return str(y), str(x), lat2, lon2, False
