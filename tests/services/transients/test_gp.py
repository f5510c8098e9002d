from __future__ import annotations

import numpy as np
import pytest

from services.transients.curves import Curve
from services.transients.gp import fit_gp, flux_scale, gp_grid, gp_grids, trim

ZTF = (4746.48, 6366.38)


def bazin(t: np.ndarray, amplitude: float = 1000.0, t0: float = 30.0, rise: float = 4.0,
          fall: float = 20.0) -> np.ndarray:
    return amplitude * np.exp(-(t - t0) / fall) / (1.0 + np.exp(-(t - t0) / rise))


def make_curve(t: np.ndarray, passband: np.ndarray, flux: np.ndarray, err: float | np.ndarray = 10.0,
               detected: np.ndarray | None = None) -> Curve:
    order = np.argsort(t, kind="stable")
    err_arr = np.broadcast_to(np.asarray(err, dtype=np.float64), t.shape)
    det = np.ones(len(t), bool) if detected is None else detected
    return Curve("obj", t[order].astype(np.float64), passband[order].astype(np.int64), flux[order].astype(np.float64),
                 err_arr[order].copy(), det[order])


def two_band_curve(n: int = 30, seed: int = 0) -> Curve:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, 90.0, n))
    pb = rng.integers(0, 2, n)
    flux = bazin(t) * np.where(pb == 0, 1.0, 0.8) + rng.normal(0.0, 10.0, n)
    return make_curve(t, pb, flux)


def test_grid_shape_and_dtype() -> None:
    grid = gp_grid(two_band_curve(), ZTF, steps=100)
    assert grid.mean.shape == grid.std.shape == (100, 2)
    assert grid.mean.dtype == grid.std.dtype == np.float32
    assert grid.times.shape == (100,) and grid.times[0] == 0.0
    assert np.all(np.diff(grid.times) > 0)
    assert np.isfinite(grid.mean).all() and (grid.std >= 0).all()
    assert grid.scale > 0


def test_mean_passes_through_dense_noiseless_observations() -> None:
    t = np.repeat(np.linspace(0.0, 90.0, 60), 2)
    pb = np.tile([0, 1], 60)
    flux = bazin(t) * np.where(pb == 0, 1.0, 0.7)
    curve = make_curve(t, pb, flux, err=1e-3 * flux.max())
    gp = fit_gp(curve, ZTF)
    mean, std = gp.predict(curve.mjd, np.asarray(ZTF)[curve.passband])
    target = curve.flux / gp.scale
    assert gp.success
    assert np.max(np.abs(mean - target)) < 1e-3
    assert np.max(std) < 0.01
    # the grid (evenly spaced, between the observations) follows the curve too
    grid = gp_grid(curve, ZTF, steps=100)
    times = np.linspace(0.0, 90.0, 100)
    np.testing.assert_allclose(grid.mean[:, 0], bazin(times) / grid.scale, atol=2e-3)


def test_missing_band_is_filled_through_the_wavelength_correlation() -> None:
    t = np.linspace(0.0, 90.0, 40)
    curve = make_curve(t, np.zeros(40, np.int64), bazin(t))
    grid = gp_grid(curve, ZTF, steps=100)
    observed, filled = grid.mean[:, 0], grid.mean[:, 1]
    assert np.corrcoef(observed, filled)[0, 1] > 0.99
    # Matern-3/2 at 1620 A / 6000 A is 0.92: the unobserved band carries most of the signal, and is less certain
    assert 0.6 < filled.max() / observed.max() < 0.95
    assert (grid.std[:, 1] > grid.std[:, 0]).all()


def test_trim_keeps_the_window_around_the_detections() -> None:
    t = np.array([0.0, 40.0, 55.0, 100.0, 120.0, 200.0, 249.0, 260.0])
    detected = np.array([False, False, False, True, True, True, False, False])
    curve = make_curve(t, np.zeros(len(t), np.int64), np.ones(len(t)), detected=detected)
    kept = trim(curve, 50.0)
    # strictly inside (first detection - 50, last detection + 50) = (50, 250); non-detections inside stay
    np.testing.assert_array_equal(kept.mjd, [55.0, 100.0, 120.0, 200.0, 249.0])
    undetected = make_curve(t, np.zeros(len(t), np.int64), np.ones(len(t)), detected=np.zeros(len(t), bool))
    assert len(trim(undetected, 50.0)) == len(t)
    # the grid spans only the trimmed part
    assert gp_grid(curve, ZTF, steps=10).times[-1] == pytest.approx(249.0 - 55.0)


@pytest.mark.parametrize("case", ["single_point", "constant", "same_time", "one_band", "zero_flux", "negative",
                                  "dynamic_range"])
def test_degenerate_curves_give_finite_grids(case: str) -> None:
    t = np.linspace(0.0, 60.0, 20)
    pb = np.arange(20) % 2
    curves = {
        "single_point": make_curve(np.array([10.0]), np.array([1]), np.array([500.0])),
        "constant": make_curve(t, pb, np.full(20, 300.0)),
        "same_time": make_curve(np.full(6, 5.0), np.arange(6) % 2, np.array([1.0, 2, 3, 4, 5, 6]) * 100),
        "one_band": make_curve(t, np.ones(20, np.int64), bazin(t)),
        "zero_flux": make_curve(t, pb, np.zeros(20)),
        "negative": make_curve(t, pb, -bazin(t) + 50.0),
        "dynamic_range": make_curve(t, pb, np.where(np.arange(20) == 7, 1e9, 1e-3), err=np.full(20, 1e-4)),
    }
    grid = gp_grid(curves[case], ZTF, steps=50)
    assert grid.mean.shape == (50, 2)
    assert np.isfinite(grid.mean).all() and np.isfinite(grid.std).all() and np.isfinite(grid.times).all()
    assert np.isfinite(grid.scale) and grid.scale > 0


def test_constant_curve_grid_is_flat() -> None:
    t = np.linspace(0.0, 60.0, 20)
    grid = gp_grid(make_curve(t, np.arange(20) % 2, np.full(20, 300.0), err=3.0), ZTF, steps=50)
    assert np.ptp(grid.mean) < 0.05 and np.abs(grid.mean - 1.0).max() < 0.1


def test_flux_scale_uses_the_highest_signal_to_noise_point() -> None:
    flux = np.array([100.0, -400.0, 300.0])
    err = np.array([1.0, 200.0, 10.0])
    assert flux_scale(flux, err) == 100.0  # S/N 100 beats 30 and 2
    assert flux_scale(np.zeros(3), np.ones(3)) == 1.0


def test_deterministic_and_workers_agree() -> None:
    curves = [two_band_curve(seed=s) for s in range(6)]
    first = gp_grid(curves[0], ZTF)
    again = gp_grid(curves[0], ZTF)
    np.testing.assert_array_equal(first.mean, again.mean)
    np.testing.assert_array_equal(first.std, again.std)
    serial = gp_grids(curves, ZTF, steps=100, workers=1, progress=False)
    assert serial.shape == (6, 100, 2) and serial.dtype == np.float32
    np.testing.assert_array_equal(serial[0], first.mean)
    np.testing.assert_array_equal(gp_grids(curves, ZTF, steps=100, workers=2, progress=False), serial)


def test_posterior_draws_have_the_posterior_mean_and_spread() -> None:
    curve = two_band_curve(n=25, seed=3)
    gp = fit_gp(curve, ZTF)
    times = np.array([5.0, 33.0, 61.0, 88.0, 120.0])  # inside the data, and beyond it (larger spread)
    wavelengths = np.array([ZTF[0], ZTF[1], ZTF[0], ZTF[1], ZTF[0]])
    mean, std = gp.predict(times, wavelengths)
    rng = np.random.default_rng(0)
    draws = np.stack([gp.sample(times, wavelengths, rng) for _ in range(4000)])  # (4000, 5)
    assert np.allclose(draws.mean(axis=0), mean, atol=4 * std.max() / np.sqrt(4000))
    assert np.allclose(draws.std(axis=0), std, rtol=0.1, atol=1e-3)
    assert std[-1] > 3 * std[1]  # 30 days past the last point the GP is unsure
    # one joint draw: neighbouring times move together (correlated), unlike independent noise
    pair = np.stack([gp.sample(np.array([150.0, 150.5]), np.array([ZTF[0], ZTF[0]]), rng) for _ in range(2000)])
    assert np.corrcoef(pair.T)[0, 1] > 0.9
