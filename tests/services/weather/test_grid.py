"""The grid: latitude weights, global detection, saved axes."""

from __future__ import annotations

import numpy as np
import pytest

from services.weather.grid import Grid


def test_grid_weights_and_global_detection() -> None:
    lon, lat = np.meshgrid(np.arange(0, 360, 90.0), [60.0, 0.0, -60.0])
    grid = Grid(lat, lon)
    w = grid.weights()
    assert w.mean() == pytest.approx(1.0) and w[1, 0] == pytest.approx(2 * w[0, 0])
    assert grid.is_global
    assert not Grid(lat[:, :2], lon[:, :2]).is_global
    lat_axis, lon_axis = grid.axes()  # what the saved state holds: the 1-D axes of a regular grid
    assert lat_axis.tolist() == [60.0, 0.0, -60.0] and lon_axis.tolist() == [0.0, 90.0, 180.0, 270.0]
    assert Grid.from_axes(lat_axis, lon_axis, True).lat.tolist() == grid.lat.tolist()
    curvilinear = Grid(lat + 0.1 * lon, lon, regular=False)
    back = Grid.from_axes(*curvilinear.axes(), regular=False)
    assert back.lat.tolist() == curvilinear.lat.tolist() and not back.regular
