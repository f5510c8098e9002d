"""Inputs known in advance for any time and place (so the model gets them for the time it forecasts), and
the daily cycle: the harmonic basis and the climatology fitted on it."""

from __future__ import annotations

import math

import numpy as np

from .config import FORCINGS
from .grid import Grid


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


YEAR = np.timedelta64(365, "D")


def resolve_forcings(names: tuple[str, ...], times: np.ndarray) -> tuple[str, ...]:
    """The forcings a model of ``names`` reads on a record at ``times``: ``("auto",)`` is every one of FORCINGS,
    less the day of year when the record spans less than a year; other names are kept as given."""
    if tuple(names) != ("auto",):
        return tuple(names)
    times = np.asarray(times).astype("datetime64[s]")
    short = len(times) == 0 or times.max() - times.min() < YEAR
    return tuple(f for f in FORCINGS if not (short and f.endswith("_day_of_year")))


def coordinate_statics(grid: Grid) -> np.ndarray:
    """(4, H, W): sin/cos of latitude and longitude, the position inputs every model gets."""
    lat, lon = np.deg2rad(grid.lat), np.deg2rad(grid.lon)
    return np.stack([np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)]).astype(np.float32)


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
