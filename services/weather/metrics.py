"""WeatherBench-2 scores: latitude-weighted RMSE and anomaly correlation (ACC), per channel and lead time.

Arrays are (N, L, C, H, W): N initial times, L lead times, C channels; ``weights`` (H, W) have mean 1.
RMSE is the square root of the time mean of the weighted spatial MSE; ACC is computed per initial time on
anomalies from a climatology and then averaged over initial times.
"""

from __future__ import annotations

import numpy as np


def weighted_rmse(forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(L, C): sqrt(mean_N(mean_HW(w (f - o)^2)))."""
    mse = ((forecast.astype(np.float64) - truth) ** 2 * weights).mean(axis=(-2, -1))  # (N, L, C)
    return np.sqrt(mse.mean(axis=0))


def acc(forecast: np.ndarray, truth: np.ndarray, climatology: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(L, C): mean over N of sum(w f' o') / sqrt(sum(w f'^2) sum(w o'^2)), with f' = f - clim, o' = o - clim.
    A forecast with no anomaly anywhere (climatology itself) scores 0."""
    f = forecast.astype(np.float64) - climatology
    o = truth.astype(np.float64) - climatology
    num = (weights * f * o).sum(axis=(-2, -1))
    den = np.sqrt((weights * f * f).sum(axis=(-2, -1)) * (weights * o * o).sum(axis=(-2, -1)))
    score = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12)  # (N, L, C)
    return score.mean(axis=0)


def hourly_climatology(values: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(24, C, H, W): the mean state at each hour of the day (UTC) over ``values`` (T, C, H, W). Hours absent
    from the record fall back to the all-hours mean. (With a month of data there is no day-of-year
    climatology; the diurnal cycle is what a 2 m temperature climatology must capture.)"""
    hours = (np.asarray(times).astype("datetime64[h]").astype(np.int64) % 24)
    overall = values.mean(axis=0)
    return np.stack([values[hours == h].mean(axis=0) if (hours == h).any() else overall for h in range(24)])


def climatology_at(clim: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The climatology (24, C, H, W) at ``times`` (any shape) -> times.shape + (C, H, W)."""
    hours = np.asarray(times).astype("datetime64[h]").astype(np.int64) % 24
    return clim[hours]
