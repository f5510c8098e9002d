"""WeatherBench-2 RMSE and ACC, and the hour-of-day climatology."""

from __future__ import annotations

import numpy as np
import pytest

from services.weather.metrics import acc, climatology_at, hourly_climatology, weighted_rmse


def test_weighted_rmse_by_hand() -> None:
    weights = np.array([[2.0, 2.0], [0.0, 0.0]])  # mean 1: the second row does not count
    truth = np.zeros((2, 1, 1, 2, 2))
    forecast = truth.copy()
    forecast[0, 0, 0] = [[1.0, 3.0], [100.0, 100.0]]  # weighted MSE (2 + 18) / 4 = 5
    forecast[1, 0, 0] = [[1.0, 1.0], [-7.0, 9.0]]  # (2 + 2) / 4 = 1
    assert weighted_rmse(forecast, truth, weights)[0, 0] == pytest.approx(np.sqrt(3.0))  # sqrt of the time mean


def test_acc_perfect_inverted_and_climatology() -> None:
    rng = np.random.default_rng(0)
    clim = rng.normal(size=(3, 2, 1, 4, 5))
    truth = clim + rng.normal(size=clim.shape)
    weights = np.ones((4, 5))
    assert acc(truth, truth, clim, weights) == pytest.approx(np.ones((2, 1)))
    assert acc(2 * clim - truth, truth, clim, weights) == pytest.approx(-np.ones((2, 1)))
    assert acc(clim, truth, clim, weights) == pytest.approx(np.zeros((2, 1)))  # no anomaly forecast: 0, not NaN


def test_hourly_climatology_by_hour_of_day() -> None:
    times = np.datetime64("2019-03-01T00", "ns") + np.arange(48) * np.timedelta64(1, "h")
    values = (np.arange(48) % 24).astype(np.float64)[:, None, None, None] + np.arange(48)[:, None, None, None] // 24
    clim = hourly_climatology(values, times)
    assert clim.shape == (24, 1, 1, 1)
    assert clim[5, 0, 0, 0] == pytest.approx(5.5)  # hour 5 on day 0 (5) and day 1 (6)
    at = climatology_at(clim, np.array([["2020-01-01T05", "2020-01-01T23"]], dtype="datetime64[ns]"))
    assert at.shape == (1, 2, 1, 1, 1) and at[0, 1, 0, 0, 0] == pytest.approx(23.5)


def test_diurnal_persistence_replays_the_same_hour_of_the_day_before() -> None:
    from services.weather.evaluation import diurnal_persistence

    values = np.arange(100, dtype=np.float64)[:, None, None] * np.ones((1, 2, 3))  # state index as the value
    inits = np.array([30, 36])
    out = diurnal_persistence(values, inits, [6, 12, 24, 30], data_step_hours=1.0)
    assert out is not None and out.shape == (2, 4, 2, 3)
    # +6 h: 18 h before the start; +24 h: the start itself (persistence); +30 h: 18 h before it again
    assert out[:, :, 0, 0].tolist() == [[12, 18, 30, 12], [18, 24, 36, 18]]
    assert diurnal_persistence(values, np.array([10]), [6], 1.0) is None  # the record starts too late
    assert diurnal_persistence(values, inits, [6], 5.0) is None  # 5-hourly data cannot hit the same hour
    assert diurnal_persistence(values[::6], np.array([4]), [6, 12, 18, 24], 6.0)[0, :, 0, 0].tolist() == [
        1 * 6, 2 * 6, 3 * 6, 4 * 6]


def test_relaxed_diurnal_persistence_finds_how_far_anomalies_decay_toward_the_daily_cycle() -> None:
    """Ten days of a pure daily cycle (the training period), then anomalies that keep 60 % of themselves from
    one day to the next at every hour: the relaxation fitted at +24 h is 0.4, and the baseline is exact."""
    from services.weather.evaluation import diurnal_persistence, relaxed_diurnal_persistence
    from services.weather.forcings import daily_harmonics

    n = 24 * 20
    times = np.datetime64("2019-03-01T00") + np.arange(n).astype("timedelta64[h]")
    rng = np.random.default_rng(0)
    cycle = np.einsum("tj,jhw->thw", daily_harmonics(np.arange(n) % 24, 2), rng.normal(size=(5, 2, 3)))[:, None]
    anomaly = np.zeros((n, 1, 2, 3))
    anomaly[240:264] = rng.normal(size=(24, 1, 2, 3))
    for t in range(264, n):
        anomaly[t] = 0.6 * anomaly[t - 24]
    values = cycle + anomaly  # (T, 1, 2, 3)
    inits = np.array([270, 281])
    out = relaxed_diurnal_persistence(values, times, (0, 240), np.arange(264, 400), inits, [24], 1.0,
                                      np.ones((2, 3)))
    plain = diurnal_persistence(values, inits, [24], 1.0)
    assert out is not None and plain is not None and out.shape == (2, 1, 1, 2, 3)
    assert np.allclose(out[:, 0], values[inits + 24], atol=1e-6)
    assert not np.allclose(plain[:, 0], values[inits + 24], atol=1e-2)  # plain diurnal persistence is not


def test_block_bootstrap_keeps_runs_of_consecutive_initial_times() -> None:
    from services.weather.metrics import block_bootstrap, interval

    idx = block_bootstrap(50, 10, 200, seed=1)
    assert idx.shape == (200, 50) and idx.min() >= 0 and idx.max() < 50
    runs = np.diff(idx[:, :10], axis=1) % 50  # the first block of every resample: ten consecutive times
    assert (runs == 1).all()
    counts = np.bincount(block_bootstrap(50, 10, 4000, seed=2).ravel(), minlength=50)
    assert counts.min() > 0.9 * counts.mean()  # every time equally likely (circular): no edge is under-drawn
    assert not (idx == idx[0]).all()  # resamples differ
    np.testing.assert_array_equal(block_bootstrap(50, 10, 200, seed=1), idx)  # and are reproducible
    assert block_bootstrap(3, 10, 5).shape == (5, 3)  # a block longer than the record is the record
    # the interval of a mean under autocorrelation: blocks give a wider one than single times
    rng = np.random.default_rng(0)
    series = np.repeat(rng.normal(size=20), 10)  # 200 times, each value held for 10 consecutive times
    single = interval(series[block_bootstrap(200, 1, 2000)].mean(axis=1))
    blocks = interval(series[block_bootstrap(200, 20, 2000)].mean(axis=1))
    assert blocks[1] - blocks[0] > 1.5 * (single[1] - single[0])
    assert blocks[0] < series.mean() < blocks[1]


def test_activity_and_bias() -> None:
    from services.weather.metrics import activity, bias

    weights = np.ones((4, 5))
    clim = np.zeros((3, 1, 1, 4, 5))
    truth = np.random.default_rng(0).normal(size=(3, 1, 1, 4, 5))
    assert activity(clim, clim, weights)[0, 0] == 0.0  # climatology has no anomaly
    expected = np.mean([truth[n, 0, 0].std() for n in range(3)])
    assert activity(truth, clim, weights)[0, 0] == pytest.approx(expected)
    assert activity(truth + 7.0, clim, weights)[0, 0] == pytest.approx(expected)  # a shift is bias, not activity
    assert bias(truth + 0.25, truth, weights)[0, 0] == pytest.approx(0.25)
