"""Training data: time splits, rollout windows, normalization and the saved state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.weather.config import WeatherConfig
from services.weather.data import RolloutDataset, prepare, split_bounds, starts
from services.weather.synthetic import synthetic_dataset


def test_splits_are_contiguous_in_time_and_windows_stay_inside() -> None:
    bounds = split_bounds(100, 0.2, 0.2)
    assert bounds == [(0, 60), (60, 80), (80, 100)]
    idx = starts((60, 80), offset=6, history=2, span=2, every=1)
    assert idx[0] == 66 and idx[-1] + 12 <= 79
    assert len(starts((0, 10), offset=6, history=1, span=2, every=1)) == 0


def test_rollout_window_aligns_history_forcings_and_targets() -> None:
    states = np.arange(30, dtype=np.float32)[:, None, None, None] * np.ones((30, 1, 2, 3), np.float32)
    force = np.arange(30, dtype=np.float32)[:, None, None, None] * np.ones((30, 5, 2, 3), np.float32)
    hours = np.arange(30, dtype=np.float64) % 24
    ds = RolloutDataset(states, force, np.array([10]), offset=3, history=2, rollout=2, hours=hours)
    hist, f, target, hour = ds[0]
    assert hist[:, 0, 0, 0].tolist() == [7.0, 10.0]
    assert f[:, 0, 0, 0].tolist() == [10.0, 13.0, 16.0]
    assert target[:, 0, 0, 0].tolist() == [13.0, 16.0]
    assert float(hour) == 10.0  # the hour of the day of the last history state
    assert isinstance(hist, torch.Tensor)


def test_prepare_normalizes_with_training_statistics_only(tmp_path: Path) -> None:
    cfg = WeatherConfig(synthetic_days=4, synthetic_grid=(16, 32), train_rollout=2, history=1, residual_base="last")
    prepared = prepare(cfg)
    a, b = prepared.bounds[0]
    train = prepared.normalized[a:b]
    assert np.abs(train.mean(axis=(0, 2, 3))).max() < 1e-3
    assert np.abs(train.std(axis=(0, 2, 3)) - 1).max() < 1e-3
    state = prepared.state
    assert state.channels == ("t_850", "t_500", "t2m") and state.static_names == ("lsm", "orography")
    assert state.periods["train"][0] == "2000-01-01T00" and prepared.offset == 6
    assert state.mean.dtype == torch.float64 and state.mean.tolist() == pytest.approx(
        prepared.fields.values[a:b].mean(axis=(0, 2, 3), dtype=np.float64).tolist())
    assert state.statics["lsm"].shape == (16, 32) and state.grid.shape == (16, 32) and state.grid.is_global
    clim = state.climatology.numpy()  # the training period's daily cycle, 2 harmonics, normalized
    assert clim.shape == (5, 3, 16, 32) and np.abs(clim[0].mean(axis=(1, 2))).max() < 0.05
    assert state.damping is None and state.relaxation is None  # fitted after training (calibrate)
    twelve_hourly = tmp_path / "twelve_hourly.nc"
    synthetic_dataset(days=2, grid=(16, 32), seed=0).isel(time=slice(0, None, 12)).to_netcdf(twelve_hourly)
    with pytest.raises(ValueError, match="not a multiple of the data's time step \\(12 h\\)"):
        prepare(cfg, data=str(twelve_hourly))
