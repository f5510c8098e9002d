"""Gridded data for the weather domain: an xarray reader (netCDF, zarr, GRIB), forcings, a synthetic
advection-diffusion world, and the windows the trainer samples.

Everything is turned into one in-memory layout, :class:`Fields`: ``values`` (T, C, H, W) in physical units,
one channel per variable and level (``t2m``, ``t_850``, ...), regular times, and the grid as 2-D latitude and
longitude arrays (so curvilinear grids such as CREDIT's (y, x) files fit too).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import FORCINGS

if TYPE_CHECKING:
    import xarray as xr

GRIB_SUFFIXES = (".grib", ".grb", ".grib2", ".grb2")
LEVEL_DIMS = ("level", "isobaricInhPa", "pressure_level", "plev", "lev")
MEMBER_DIMS = ("number", "member", "realization")
LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")
COORD_STATICS = ("sin_lat", "cos_lat", "sin_lon", "cos_lon")


def open_dataset(path: str | Path) -> xr.Dataset:
    """Open netCDF, zarr or GRIB (cfgrib, no index file written beside the data) with ERA5 names."""
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weather data {path} does not exist")
    if path.suffix.lower() in GRIB_SUFFIXES:
        ds = xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""})
    elif path.suffix.lower() == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
        ds = xr.open_zarr(path)
    else:
        ds = xr.open_dataset(path)
    return standardize(ds)


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

    def to_info(self) -> dict[str, Any]:
        if self.regular:
            return {"latitude": self.lat[:, 0].tolist(), "longitude": self.lon[0].tolist(), "regular": True}
        return {"latitude": self.lat.tolist(), "longitude": self.lon.tolist(), "regular": False}

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Grid:
        lat, lon = np.asarray(info["latitude"], np.float64), np.asarray(info["longitude"], np.float64)
        if info.get("regular", True):
            lon2, lat2 = np.meshgrid(lon, lat)
            return cls(lat2, lon2, True)
        return cls(lat, lon, False)


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
    with open_dataset(path) as ds:
        return read_fields(ds.load(), name=Path(path).name, **kwargs)


# --- forcings: known in advance for any time, so the model gets them for the time it forecasts -------------

def forcings(times: np.ndarray, grid: Grid, names: tuple[str, ...] | list[str] = FORCINGS) -> np.ndarray:
    """(T, F, H, W) float32, the ``names`` among :data:`FORCINGS` in that order: top-of-atmosphere cos(solar
    zenith) (0 at night), local solar hour and day of year as sin/cos. Computed from time and position only, so
    they are exact at every lead time."""
    times = np.asarray(times).astype("datetime64[s]")
    day = (times - times.astype("datetime64[Y]")).astype(np.float64) / 86400.0  # fractional day of year
    hour_utc = (day % 1.0) * 24.0
    year_angle = 2 * math.pi * day / 365.25
    declination = np.deg2rad(23.44) * np.sin(2 * math.pi * (284.0 + day) / 365.25)
    lat = np.deg2rad(grid.lat)[None]  # (1, H, W)
    local_hour = (hour_utc[:, None, None] + grid.lon[None] / 15.0) % 24.0  # (T, H, W)
    hour_angle = np.deg2rad(15.0 * (local_hour - 12.0))
    dec = declination[:, None, None]
    cos_zenith = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(hour_angle)
    hour_phase = 2 * math.pi * local_hour / 24.0
    ones = np.ones_like(local_hour)
    every = {"cos_zenith": cos_zenith.clip(min=0.0), "sin_local_hour": np.sin(hour_phase),
             "cos_local_hour": np.cos(hour_phase), "sin_day_of_year": np.sin(year_angle)[:, None, None] * ones,
             "cos_day_of_year": np.cos(year_angle)[:, None, None] * ones}
    return np.stack([every[name] for name in names], axis=1).astype(np.float32)


def coordinate_statics(grid: Grid) -> np.ndarray:
    """(4, H, W): sin/cos of latitude and longitude, the position inputs every model gets."""
    lat, lon = np.deg2rad(grid.lat), np.deg2rad(grid.lon)
    return np.stack([np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)]).astype(np.float32)


# --- synthetic world -----------------------------------------------------------------------------------------

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


# --- normalization, splits and training windows --------------------------------------------------------------

def split_bounds(n_times: int, val_fraction: float, test_fraction: float) -> list[tuple[int, int]]:
    """Contiguous train / validation / test index ranges, in time order."""
    n_test = int(round(n_times * test_fraction))
    n_val = int(round(n_times * val_fraction))
    n_train = n_times - n_val - n_test
    return [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n_times)]


def starts(bounds: tuple[int, int], offset: int, history: int, span: int, every: int) -> np.ndarray:
    """Initial indices t in [a, b) with t - (history - 1) * offset >= a and t + span * offset < b."""
    a, b = bounds
    first = a + (history - 1) * offset
    last = b - 1 - span * offset
    return np.arange(first, last + 1, every) if last >= first else np.zeros(0, dtype=np.int64)


def utc_hours(times: np.ndarray) -> np.ndarray:
    """Hour of the day (UTC, fractional) of ``times`` (datetime64, any shape), float64."""
    t = np.asarray(times).astype("datetime64[s]")
    return (t - t.astype("datetime64[D]")).astype(np.float64) / 3600.0


def daily_harmonics(hours: np.ndarray, harmonics: int) -> np.ndarray:
    """(..., 2 * harmonics + 1) regressors of the daily cycle at ``hours`` (UTC): 1, cos, sin, cos 2, sin 2, ..."""
    phase = 2 * math.pi * np.asarray(hours, np.float64)[..., None] * np.arange(1, harmonics + 1) / 24.0
    cols = [np.ones_like(phase[..., :1])]
    for j in range(harmonics):
        cols += [np.cos(phase[..., j: j + 1]), np.sin(phase[..., j: j + 1])]
    return np.concatenate(cols, axis=-1)


def fit_climatology(values: np.ndarray, times: np.ndarray, harmonics: int) -> np.ndarray:
    """(2 * harmonics + 1, C, H, W): the mean daily cycle of ``values`` (T, C, H, W) at every point, as the
    least-squares coefficients of :func:`daily_harmonics` (a smooth hourly climatology of the period; with
    data every 6 h the harmonics the samples cannot tell apart get zero)."""
    basis = daily_harmonics(utc_hours(times), harmonics)  # (T, J)
    flat = values.reshape(len(values), -1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, flat, rcond=None)
    return coef.reshape(basis.shape[1], *values.shape[1:]).astype(np.float32)


class RolloutDataset(torch.utils.data.Dataset):
    """Training windows: ``history`` input states ending at t, the forcings at t, t + dt, ..., t + K dt, the
    K target states (all normalized) and the hour of the day of t (UTC), which places the climatology."""

    def __init__(self, states: np.ndarray, forcing: np.ndarray, indices: np.ndarray, offset: int, history: int,
                 rollout: int, hours: np.ndarray) -> None:
        self.states = torch.from_numpy(states)  # (T, C, H, W)
        self.forcing = torch.from_numpy(forcing)  # (T, F, H, W)
        self.hours = torch.from_numpy(hours).float()  # (T,) UTC hour of the day of each state
        self.indices = indices
        self.offset, self.history, self.rollout = offset, history, rollout

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t, o = int(self.indices[i]), self.offset
        hist = self.states[t - (self.history - 1) * o: t + 1: o]  # (h, C, H, W)
        force = self.forcing[t: t + self.rollout * o + 1: o]  # (K + 1, F, H, W)
        target = self.states[t + o: t + self.rollout * o + 1: o]  # (K, C, H, W)
        return hist, force, target, self.hours[t]


@dataclass
class Prepared:
    fields: Fields
    normalized: np.ndarray  # (T, C, H, W)
    forcing: np.ndarray  # (T, F, H, W)
    bounds: list[tuple[int, int]]
    offset: int  # time indices per model step
    datasets: list[RolloutDataset]
    info: dict[str, Any]


def fields_for(cfg: Any, data: str | None = None) -> Fields:
    """The configured channels of ``data`` (default: the config's data, else the synthetic world)."""
    path = data or cfg.data
    kwargs = {"variables": tuple(cfg.variables), "levels": tuple(cfg.levels),
              "static_variables": tuple(cfg.static_variables), "member": cfg.member}
    if path:
        return load_fields(path, **kwargs)
    return read_fields(synthetic_dataset(cfg.synthetic_days, tuple(cfg.synthetic_grid), seed=cfg.seed),
                       name="synthetic", **kwargs)


def time_offset(fields: Fields, step_hours: int) -> int:
    """Time indices per model step; the data's time step must divide the model's."""
    native = fields.step_hours
    ratio = step_hours / native if native == native else float("nan")
    if not (ratio >= 1 and abs(ratio - round(ratio)) < 1e-6):
        raise ValueError(f"step_hours={step_hours} is not a multiple of the data's time step ({native:g} h)")
    return int(round(ratio))


def prepare(cfg: Any, data: str | None = None) -> Prepared:
    """Read, split in time (train / val / test), normalize with training statistics, and window."""
    fields = fields_for(cfg, data)
    offset = time_offset(fields, cfg.step_hours)
    every = max(1, int(round(cfg.sample_every_hours / fields.step_hours)))
    bounds = split_bounds(len(fields.times), cfg.val_fraction, cfg.test_fraction)
    train = fields.values[bounds[0][0]: bounds[0][1]]
    mean = train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = train.std(axis=(0, 2, 3), dtype=np.float64) + 1e-6
    normalized = ((fields.values - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    forcing = forcings(fields.times, fields.grid, cfg.forcings)
    hours = utc_hours(fields.times)
    datasets = []
    for a, b in bounds:
        idx = starts((a, b), offset, cfg.history, cfg.train_rollout, every)
        if len(idx) == 0:
            raise ValueError(f"{fields.name}: a split of {b - a} time steps is too short for history {cfg.history} "
                             f"and {cfg.train_rollout} steps of {cfg.step_hours} h; use longer data or smaller settings")
        datasets.append(RolloutDataset(normalized, forcing, idx, offset, cfg.history, cfg.train_rollout, hours))
    a, b = bounds[0]
    climatology = fit_climatology(normalized[a:b], fields.times[a:b], cfg.climatology_harmonics)

    def iso(i: int) -> str:
        return str(np.datetime_as_string(fields.times[i], unit="h"))

    info = {"data": fields.name, "fingerprint": fields.fingerprint, "channels": fields.channels,
            "sources": [list(s) for s in fields.sources],
            "units": fields.units, "mean": mean.tolist(), "std": std.tolist(), "grid": fields.grid.to_info(),
            "step_hours": cfg.step_hours, "data_step_hours": fields.step_hours, "forcings": list(cfg.forcings),
            "static_names": list(fields.statics),
            "statics": {k: np.round(v, 4).tolist() for k, v in fields.statics.items()},
            "periods": {name: [iso(a), iso(b - 1)] for name, (a, b) in zip(("train", "val", "test"), bounds, strict=True)},
            # the training period's mean daily cycle (normalized), which calibration relaxes the forecast to
            "climatology": np.round(climatology, 4).tolist()}
    return Prepared(fields, normalized, forcing, bounds, offset, datasets, info)
