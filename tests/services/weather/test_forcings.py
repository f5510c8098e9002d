"""Forcings known in advance (the sun, local hour) and the daily-cycle climatology."""

from __future__ import annotations

import numpy as np
import pytest

from services.weather.forcings import daily_harmonics, fit_climatology, forcings, utc_hours
from services.weather.grid import Grid


def test_forcings_follow_the_sun() -> None:
    lat, lon = np.meshgrid([0.0, 60.0], [0.0, 180.0], indexing="ij")
    grid = Grid(lat, lon)
    noon = forcings(np.array(["2019-03-20T12:00"], dtype="datetime64[ns]"), grid)[0]  # equinox, noon at lon 0
    assert noon.shape == (5, 2, 2)
    assert noon[0, 0, 0] == pytest.approx(1.0, abs=0.02)  # sun overhead at the equator
    assert noon[0, 1, 0] == pytest.approx(0.5, abs=0.02)  # cos(60 deg) at 60 N
    assert noon[0, 0, 1] == 0.0  # midnight on the other side of the globe
    assert noon[1, 0, 0] == pytest.approx(0.0, abs=1e-5) and noon[2, 0, 0] == pytest.approx(-1.0, abs=1e-5)


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


def test_auto_forcings_leave_out_the_day_of_year_on_records_shorter_than_a_year() -> None:
    from services.weather.config import FORCINGS, WeatherConfig
    from services.weather.data import prepare
    from services.weather.forcings import resolve_forcings

    month = np.datetime64("2019-03-01T00") + np.arange(0, 24 * 31).astype("timedelta64[h]")
    years = np.datetime64("2017-01-01T00") + np.arange(0, 24 * 400, 6).astype("timedelta64[h]")
    assert resolve_forcings(("auto",), month) == ("cos_zenith", "sin_local_hour", "cos_local_hour")
    assert resolve_forcings(("auto",), years) == FORCINGS
    assert resolve_forcings(FORCINGS, month) == FORCINGS  # asked for by name: kept
    assert WeatherConfig().forcings == ("auto",)
    with pytest.raises(ValueError, match="expected 'auto' or distinct names"):
        WeatherConfig(forcings=("auto", "cos_zenith"))
    cfg = WeatherConfig(synthetic_days=4, synthetic_grid=(8, 16), history=1, residual_base="last", train_rollout=1)
    assert prepare(cfg).state.forcings == ("cos_zenith", "sin_local_hour", "cos_local_hour")  # what the model reads
