"""The synthetic world: ERA5 layout and its dynamics."""

from __future__ import annotations

import numpy as np
import pytest

from services.weather.readers import read_fields
from services.weather.synthetic import synthetic_dataset


@pytest.fixture(scope="module")
def world() -> object:
    return synthetic_dataset(days=3, grid=(16, 32), seed=1)


def test_synthetic_world_layout_and_dynamics(world: object) -> None:
    fields = read_fields(world, name="synthetic")  # type: ignore[arg-type]
    assert fields.channels == ["t_850", "t_500", "t2m"] and fields.units == ["K", "K", "K"]
    assert fields.values.shape == (72, 3, 16, 32) and fields.step_hours == 1.0
    assert set(fields.statics) == {"lsm", "orography"} and fields.grid.is_global
    assert np.isfinite(fields.values).all() and 200 < fields.values.mean() < 300
    # it moves: 6-hourly changes are real but smaller than the spatial spread
    change = np.abs(fields.values[6:] - fields.values[:-6]).mean()
    assert 0.05 < change < fields.values.std()
    # land has a larger diurnal cycle than sea (the sun drives the surface)
    land = fields.statics["lsm"] > 0.5
    t2m = fields.values[:, 2]
    daily_range = t2m[24:48].max(axis=0) - t2m[24:48].min(axis=0)
    assert daily_range[land].mean() > daily_range[~land].mean()
