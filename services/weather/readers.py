"""Readers of gridded data (netCDF, zarr, GRIB) into one in-memory layout, :class:`Fields`: ``values``
(T, C, H, W) in physical units, one channel per variable and level (``t2m``, ``t_850``, ...), regular times,
and the grid as 2-D latitude and longitude arrays (so curvilinear grids such as CREDIT's (y, x) files fit too).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared import datapath

from .grid import LAT_NAMES, LON_NAMES, Grid, spatial

if TYPE_CHECKING:
    import xarray as xr

GRIB_SUFFIXES = (".grib", ".grb", ".grib2", ".grb2")
LEVEL_DIMS = ("level", "isobaricInhPa", "pressure_level", "plev", "lev")
MEMBER_DIMS = ("number", "member", "realization")


def open_dataset(path: str | Path) -> xr.Dataset:
    """Open netCDF, zarr or GRIB (cfgrib, no index file written beside the data) with ERA5 names, lazily:
    variables are read when their values are asked for (zarr as dask arrays, chunk by chunk), so what a run
    reads is the channels and period it uses, not the whole store. ``path`` may be a URI (``s3://...``): a zarr
    store is read in place through fsspec; GRIB and netCDF files are copied once into the local cache, since
    their readers need a local file."""
    import xarray as xr

    datapath.require(path, "weather data")
    suffix = datapath.suffix(path)
    if suffix in GRIB_SUFFIXES:
        ds = xr.open_dataset(datapath.local_copy(path), engine="cfgrib", backend_kwargs={"indexpath": ""})
    elif suffix == ".zarr" or _is_zarr_store(path):
        ds = xr.open_zarr(datapath.mapper(path))
    else:  # netCDF: dask chunks as the file stores them
        ds = xr.open_dataset(datapath.local_copy(path), chunks={})
    return standardize(ds)


def _is_zarr_store(path: str | Path) -> bool:
    return datapath.is_dir(path) and any(datapath.exists(f"{str(path).rstrip('/')}/{marker}")
                                         for marker in ("zarr.json", ".zgroup"))


def standardize(ds: xr.Dataset) -> xr.Dataset:
    """ERA5 dimension names: ``time`` (from ``valid_time``), ``level`` (from ``isobaricInhPa``, ...),
    ``latitude`` / ``longitude`` (from ``lat`` / ``lon`` dimensions)."""
    renames: dict[str, str] = {}
    if "time" not in ds.dims and "valid_time" in ds.dims:
        renames["valid_time"] = "time"
    for name in LEVEL_DIMS[1:]:
        if name in ds.dims and "level" not in ds.dims:
            renames[name] = "level"
    for canonical, alias in (("latitude", "lat"), ("longitude", "lon")):
        if alias in ds.dims and canonical not in ds.dims:
            renames[alias] = canonical
    return ds.rename(renames) if renames else ds


@dataclass
class Fields:
    """Gridded variables as one array: ``values`` (T, C, H, W) float32 in the units of ``units``."""

    values: np.ndarray
    times: np.ndarray  # (T,) datetime64[ns], regular
    channels: list[str]
    units: list[str]
    grid: Grid
    sources: list[tuple[str, float | None]] = field(default_factory=list)  # (variable, level) per channel
    statics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (H, W)
    name: str = "synthetic"

    @property
    def step_hours(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        return float((self.times[1] - self.times[0]) / np.timedelta64(1, "h"))

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha1(np.ascontiguousarray(self.values[:: max(1, len(self.values) // 16)]).tobytes())
        digest.update(",".join(self.channels).encode())
        return f"{self.name}:{len(self.times)}x{'x'.join(map(str, self.values.shape[1:]))}:{digest.hexdigest()[:10]}"


def _level_label(level: float) -> str:
    return str(int(level)) if float(level).is_integer() else f"{level:g}"


def read_fields(ds: xr.Dataset, variables: tuple[str, ...] = (), levels: tuple[float, ...] = (),
                static_variables: tuple[str, ...] = (), member: int = 0, name: str = "dataset") -> Fields:
    """Channels (variable, level) of ``ds`` on its grid. ``variables`` () means every gridded time-varying one."""
    if "time" not in ds.dims:
        raise ValueError(f"{name}: no 'time' dimension (dims: {dict(ds.sizes)}); a forecast needs a time axis")
    ydim, xdim, lat, lon, regular = spatial(ds)
    for dim in MEMBER_DIMS:
        if dim in ds.dims:
            if member >= ds.sizes[dim]:
                raise ValueError(f"member={member}: {name} has {ds.sizes[dim]} ensemble members")
            ds = ds.isel({dim: member})
    gridded = [v for v in ds.data_vars if {"time", ydim, xdim} <= set(ds[v].dims)
               and set(ds[v].dims) <= {"time", "level", ydim, xdim}]
    if not gridded:
        raise ValueError(f"{name}: no gridded time-varying variable (need dims time, [level], {ydim}, {xdim})")
    chosen = list(variables) or gridded
    missing = [v for v in chosen if v not in gridded]
    if missing:
        raise ValueError(f"{name}: variables {missing} not found; gridded variables are {gridded}")
    times = ds["time"].values.astype("datetime64[ns]")
    if len(times) > 1:
        gaps = np.diff(times)
        if not (gaps == gaps[0]).all() or gaps[0] <= np.timedelta64(0):
            raise ValueError(f"{name}: times are not regular and increasing (steps {np.unique(gaps)[:5]})")
    arrays, channels, units = [], [], []
    sources: list[tuple[str, float | None]] = []
    for var in chosen:
        da = ds[var]
        unit = str(da.attrs.get("units", ""))
        if "level" in da.dims:
            available = [float(v) for v in ds["level"].values]
            wanted = [float(v) for v in levels] or available
            absent = [v for v in wanted if not any(abs(v - a) < 1e-6 for a in available)]
            if absent:
                raise ValueError(f"{name}: levels {absent} not in {var}'s levels {available}")
            for level in wanted:
                layer = da.sel(level=level, method="nearest").transpose("time", ydim, xdim)
                arrays.append(layer.values.astype(np.float32))
                channels.append(f"{var}_{_level_label(level)}")
                units.append(unit)
                sources.append((str(var), level))
        else:
            arrays.append(da.transpose("time", ydim, xdim).values.astype(np.float32))
            channels.append(str(var))
            units.append(unit)
            sources.append((str(var), None))
    values = np.stack(arrays, axis=1)  # (T, C, H, W)
    if not np.isfinite(values).all():
        bad = [c for i, c in enumerate(channels) if not np.isfinite(values[:, i]).all()]
        raise ValueError(f"{name}: channels {bad} hold NaN/inf (missing values are not supported)")
    statics: dict[str, np.ndarray] = {}
    static_names = list(static_variables) or [str(v) for v in ds.data_vars if set(ds[v].dims) == {ydim, xdim}
                                              and v not in LAT_NAMES + LON_NAMES]
    for var in static_names:
        if var not in ds.data_vars or set(ds[var].dims) != {ydim, xdim}:
            raise ValueError(f"{name}: static field {var!r} must be a ({ydim}, {xdim}) variable")
        statics[str(var)] = ds[var].transpose(ydim, xdim).values.astype(np.float32)
    return Fields(values=values, times=times, channels=channels, units=units, grid=Grid(lat, lon, regular),
                  sources=sources, statics=statics, name=name)


def load_fields(path: str | Path, **kwargs: Any) -> Fields:
    """The configured channels of the data at ``path``; only their variables and levels are read."""
    with open_dataset(path) as ds:
        return read_fields(ds, name=datapath.name(path), **kwargs)
