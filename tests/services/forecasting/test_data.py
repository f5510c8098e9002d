from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from services.forecasting.data import (
    WindowDataset,
    calendar_features,
    mark_names,
    prepare,
    read_table,
    split_borders,
    synthetic_frame,
)
from tests.conftest import shared_data


def test_synthetic_series_has_the_planted_structure() -> None:
    frame = synthetic_frame(2000, 4, seed=0)
    assert list(frame.columns) == ["date", "v0", "v1", "v2", "v3"]
    assert pd.infer_freq(frame["date"]) == "h"
    v0, v2 = frame["v0"].to_numpy(), frame["v2"].to_numpy()
    # daily seasonality: the autocorrelation at lag 24 is high
    detrended = v0 - np.convolve(v0, np.ones(169) / 169, mode="same")
    core = detrended[200:-200]
    assert np.corrcoef(core[:-24], core[24:])[0, 1] > 0.8
    # v2 follows v0 with a lag of 6 hours: the best-matching lag is 6
    lags = range(0, 12)
    scores = [np.corrcoef(v0[100 : 1900 - lag], v2[100 + lag : 1900])[0, 1] for lag in lags]
    assert int(np.argmax(scores)) == 6


def test_ett_split_matches_the_benchmark_protocol() -> None:
    borders = split_borders(17420, 96, "ett", pd.Timedelta(hours=1))
    assert borders == [(0, 8640), (8640 - 96, 11520), (11520 - 96, 14400)]
    minutes = split_borders(69680, 96, "ett", pd.Timedelta(minutes=15))
    assert minutes[0] == (0, 34560) and minutes[2][1] == 34560 + 2 * 11520


def test_ratio_split_and_scaler_use_training_rows_only() -> None:
    frame = synthetic_frame(1000, 3)
    frame.loc[900:, "v1"] += 1000.0  # a shift in the test period must not leak into the scaler
    prepared = prepare(frame, seq_len=48, pred_len=24, name="custom")
    assert prepared.borders == [(0, 700), (700 - 48, 800), (1000 - 200 - 48, 1000)]
    train = prepared.values[:700]
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-4)
    assert prepared.state.marks == ("hour_of_day", "day_of_week", "day_of_month", "day_of_year")
    assert prepared.state.mean.dtype == torch.float64 and prepared.state.mean.shape == (3,)


def test_windows_line_up_history_target_and_marks() -> None:
    values = np.arange(100, dtype=np.float32)[:, None].repeat(2, axis=1)
    marks = np.arange(100, dtype=np.float32)[:, None]
    ds = WindowDataset(values, marks, seq_len=10, label_len=4, pred_len=5)
    assert len(ds) == 100 - 10 - 5 + 1
    x, y, x_mark, y_mark = ds[3]
    assert x[:, 0].tolist() == list(range(3, 13)) and y[:, 0].tolist() == list(range(13, 18))
    assert y_mark[:, 0].tolist() == list(range(9, 18))  # label_len history + horizon


def test_calendar_features_are_scaled_to_half_unit_range() -> None:
    times = pd.date_range("2021-01-01", periods=24 * 400, freq="h")
    feats = calendar_features(times, mark_names(pd.Timedelta(hours=1)))
    assert feats.shape == (len(times), 4)
    assert feats.min() >= -0.5 and feats.max() <= 0.5


def _pandas_calendar(times: pd.DatetimeIndex) -> np.ndarray:
    """The features from pandas' own field accessors: what the numpy arithmetic must give."""
    fields = [times.minute / 59.0, times.hour / 23.0, times.day_of_week / 6.0, (times.day - 1) / 30.0,
              (times.day_of_year - 1) / 365.0, (times.isocalendar().week.to_numpy() - 1) / 52.0,
              (times.month - 1) / 11.0]
    return (np.stack([np.asarray(f, dtype=np.float64) for f in fields], axis=1) - 0.5).astype(np.float32)


CALENDAR_NAMES = ["minute_of_hour", "hour_of_day", "day_of_week", "day_of_month", "day_of_year", "week_of_year",
                  "month_of_year"]


def test_calendar_features_are_pandas_fields_also_before_1970_and_in_leap_years() -> None:
    rng = np.random.default_rng(0)
    ns = rng.integers(pd.Timestamp("1890-01-01").value, pd.Timestamp("2110-01-01").value, 5000)
    edges = pd.DatetimeIndex(["1969-12-31 23:59:59", "1970-01-01", "2000-02-29 12:00", "2000-12-31 23:00",
                              "1900-03-01", "2024-12-30 00:00"])
    times = pd.DatetimeIndex(ns).append(edges)
    np.testing.assert_array_equal(calendar_features(times, CALENDAR_NAMES), _pandas_calendar(times))
    # a datetime64 array gives the same as its index
    np.testing.assert_array_equal(calendar_features(times.to_numpy(), CALENDAR_NAMES), _pandas_calendar(times))


def test_calendar_features_of_tz_aware_times_count_wall_clock_time() -> None:
    times = pd.date_range("2021-03-27", periods=72, freq="h", tz="Europe/London")  # across the clock change
    np.testing.assert_array_equal(calendar_features(times, CALENDAR_NAMES), _pandas_calendar(times))


def test_readers_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "missing.csv")
    bad = tmp_path / "bad.xlsx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported format"):
        read_table(bad)
    text = tmp_path / "text.csv"
    pd.DataFrame({"date": pd.date_range("2020", periods=300, freq="h"), "a": 1.0, "b": "x"}).to_csv(text, index=False)
    with pytest.raises(ValueError, match="non-numeric columns"):
        prepare(read_table(text), seq_len=24, pred_len=24)


def test_parquet_and_csv_read_the_same(tmp_path: Path) -> None:
    frame = synthetic_frame(500, 3)
    frame.to_csv(tmp_path / "s.csv", index=False)
    frame.to_parquet(tmp_path / "s.parquet")
    a = prepare(read_table(tmp_path / "s.csv"), seq_len=24, pred_len=24)
    b = prepare(read_table(tmp_path / "s.parquet"), seq_len=24, pred_len=24)
    np.testing.assert_allclose(a.values, b.values, atol=1e-6)


@pytest.mark.data
def test_real_etth1_split_sizes() -> None:
    path = shared_data("forecasting", "ETTh1.csv")
    prepared = prepare(read_table(path), seq_len=96, pred_len=96, name="ETTh1")
    assert prepared.state.split == "ett" and prepared.state.columns[-1] == "OT"
    sizes = [b - a - 96 - 96 + 1 for a, b in prepared.borders]
    assert sizes == [8449, 2785, 2785]  # the window counts of the reference implementations


def test_request_body_turns_a_table_into_the_forecast_request() -> None:
    from services.forecasting.data import request_body

    frame = synthetic_frame(30, 2)
    body = request_body(frame)
    assert body["columns"] == ["v0", "v1"] and "date" in frame.columns  # the caller's frame is untouched
    assert body["timestamps"][:2] == ["2020-01-01T00:00:00", "2020-01-01T01:00:00"]
    assert np.allclose(body["values"], frame[["v0", "v1"]].to_numpy()) and len(body["values"]) == 30
    assert "timestamps" not in request_body(frame.drop(columns="date"))
