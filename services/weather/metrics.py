"""WeatherBench-2 scores: latitude-weighted RMSE and anomaly correlation (ACC), per channel and lead time.

Arrays are (N, L, C, H, W): N initial times, L lead times, C channels; ``weights`` (H, W) have mean 1.
RMSE is the square root of the time mean of the weighted spatial MSE; ACC is computed per initial time on
anomalies from a climatology and then averaged over initial times.
"""

from __future__ import annotations

import numpy as np


def weighted_mse(forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, L, C): mean_HW(w (f - o)^2), per initial time."""
    return ((forecast.astype(np.float64) - truth) ** 2 * weights).mean(axis=(-2, -1))


def weighted_rmse(forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(L, C): sqrt(mean_N(mean_HW(w (f - o)^2)))."""
    return np.sqrt(weighted_mse(forecast, truth, weights).mean(axis=0))


def acc_per_init(forecast: np.ndarray, truth: np.ndarray, climatology: np.ndarray,
                 weights: np.ndarray) -> np.ndarray:
    """(N, L, C): sum(w f' o') / sqrt(sum(w f'^2) sum(w o'^2)) per initial time, f' = f - clim, o' = o - clim;
    0 for a forecast with no anomaly anywhere (climatology itself)."""
    f = forecast.astype(np.float64) - climatology
    o = truth.astype(np.float64) - climatology
    num = (weights * f * o).sum(axis=(-2, -1))
    den = np.sqrt((weights * f * f).sum(axis=(-2, -1)) * (weights * o * o).sum(axis=(-2, -1)))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12)


def acc(forecast: np.ndarray, truth: np.ndarray, climatology: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(L, C): the mean over N of :func:`acc_per_init`."""
    return acc_per_init(forecast, truth, climatology, weights).mean(axis=0)


def activity(forecast: np.ndarray, climatology: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(L, C): the weighted spatial standard deviation of the anomaly f - clim, averaged over initial times.
    A forecast that smooths toward climatology loses activity; the truth's is the reference."""
    anomaly = forecast.astype(np.float64) - climatology
    mean = (anomaly * weights).mean(axis=(-2, -1), keepdims=True)
    return np.sqrt((((anomaly - mean) ** 2) * weights).mean(axis=(-2, -1))).mean(axis=0)


def bias(forecast: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(L, C): the weighted mean of f - o over space and initial times."""
    return ((forecast.astype(np.float64) - truth) * weights).mean(axis=(-2, -1)).mean(axis=0)


def block_bootstrap(n: int, block: int, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, n) indices of a circular block bootstrap of n consecutive initial times: each resample joins
    blocks of ``block`` consecutive indices (wrapping from the last time to the first) from uniformly drawn
    starts, cut to n. Blocks keep the dependence between neighbouring initial times (hourly starts a few hours
    apart share most of their weather), which resampling single times would ignore and so give intervals that
    are too narrow; wrapping gives every time the same weight, so the resamples centre on the sample's value."""
    block = max(1, min(block, n))
    rng = np.random.default_rng(seed)
    per_sample = -(-n // block)
    starts = rng.integers(0, n, size=(samples, per_sample))
    return ((starts[:, :, None] + np.arange(block)[None, None, :]) % n).reshape(samples, -1)[:, :n]


def interval(values: np.ndarray, level: float = 0.95) -> np.ndarray:
    """(2, ...) the percentile interval of bootstrap statistics ``values`` (samples, ...)."""
    tail = 50.0 * (1.0 - level)
    return np.percentile(values, [tail, 100.0 - tail], axis=0)


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
