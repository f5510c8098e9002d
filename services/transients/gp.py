"""t2's preprocessing: trim a light curve to its transient part and interpolate it with a 2-D Gaussian process.

"Paying Attention to Astronomical Transients" (Allam & McEwen) turns each light curve into a regular image before
the transformer sees it: the observations within 50 days of the detections are fitted with a Gaussian process over
(time, wavelength) with a Matern-3/2 kernel, and its mean is read on 100 evenly spaced times in every band, giving a
(100, n_bands) grid. The recipe is astronet's (``astronet/preprocess.py``: ``__transient_trim``, ``fit_2d_gp``,
``generate_gp_single_event``, ``predict_2d_gp``), itself avocado's (``AstronomicalObject.fit_gaussian_process``):

- amplitude: flux of the highest signal-to-noise observation (with a 1% error floor), the kernel variance starting
  at (0.5 * scale)^2 and bounded to within e^+-10 of that;
- time scale: starts at 20 days, bounded to [1, 1000] days; wavelength scale fixed (6000 Angstrom);
- zero mean, the flux errors as white noise; the two free parameters fitted by maximum likelihood (L-BFGS-B, exact
  gradients); the guess is kept when the fit fails.

Here the GP is an exact one in numpy/scipy on flux divided by that scale (so the fit is astronet's, in units of the
scale), which makes the grid comparable across objects; astronet robust-scales its grid per band afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
from scipy.linalg import LinAlgError, cho_solve, cholesky, solve_triangular
from scipy.optimize import minimize

from services.transients.curves import Curve

GUESS_TIME_SCALE = 20.0  # days: initial Matern time length scale (astronet, avocado)
TIME_SCALE_BOUNDS = (1.0, 1000.0)  # days: bounds of the fitted time length scale
AMPLITUDE_BOUND = 10.0  # log-variance may move this far from its guess, log(0.25 * scale^2)
_SQRT3 = math.sqrt(3.0)
T = TypeVar("T")
_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # relative to the amplitude, tried in turn when Cholesky fails


class Grid(NamedTuple):
    """The GP read on a regular grid: times (days since the first kept observation) and, per band, the mean and
    standard deviation of flux / scale."""

    times: np.ndarray  # float64 (steps,)
    mean: np.ndarray  # float32 (steps, n_bands)
    std: np.ndarray  # float32 (steps, n_bands)
    scale: float  # flux normalisation: the flux of the highest signal-to-noise observation


def trim(curve: Curve, window_days: float) -> Curve:
    """astronet's ``__transient_trim``: keep the observations strictly between window_days before the first detection
    and window_days after the last one (non-detections inside are kept). A curve without detections is kept whole
    (astronet drops such objects); astronet also shifts times to start at 0, which ``gp_grid`` does on its grid."""
    det_times = curve.mjd[curve.detected]
    if len(det_times) == 0:
        return curve
    keep = (curve.mjd > det_times.min() - window_days) & (curve.mjd < det_times.max() + window_days)
    if not keep.any():  # only when window_days <= 0; astronet then widens the window to 1000 days
        keep = (curve.mjd > det_times.min() - 1000.0) & (curve.mjd < det_times.max() + 1000.0)
    return curve.select(keep)


def flux_scale(flux: np.ndarray, flux_err: np.ndarray) -> float:
    """|flux| of the highest signal-to-noise observation, with an error floor of 1% of the largest flux so that very
    high S/N points pick the brightest one (astronet, avocado). Falls back to max |flux|, then 1."""
    floor = 1e-2 * np.max(flux)
    snr = np.abs(flux) / np.sqrt(flux_err**2 + floor**2)
    scale = float(np.abs(flux[int(np.argmax(snr))])) if np.isfinite(snr).any() else 0.0
    if not (np.isfinite(scale) and scale > 0):
        scale = float(np.max(np.abs(flux)))
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def _matern32(r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matern-3/2 of the squared scaled distance, and exp(-sqrt(3) r) (needed by the gradient)."""
    r = np.sqrt(r2)
    e = np.exp(-_SQRT3 * r)
    return (1.0 + _SQRT3 * r) * e, e


def _cholesky(kernel: np.ndarray, noise: np.ndarray, amplitude: float) -> np.ndarray | None:
    """Lower Cholesky factor of kernel + diag(noise), adding jitter when it is not numerically positive definite."""
    for jitter in _JITTERS:
        cov = kernel.copy()
        cov[np.diag_indices_from(cov)] += noise + jitter * amplitude
        try:
            return cholesky(cov, lower=True, check_finite=False)
        except LinAlgError:
            continue
    return None


@dataclass(frozen=True)
class FittedGP:
    """A GP conditioned on one light curve (normalised flux), with its fitted kernel parameters."""

    t: np.ndarray  # (n,) observation times (mjd)
    wl: np.ndarray  # (n,) observation wavelengths (Angstrom)
    chol: np.ndarray  # (n, n) lower Cholesky factor of the training covariance
    alpha: np.ndarray  # (n,) K^-1 y
    amplitude: float  # kernel variance, in units of scale^2
    time_scale: float  # days
    wavelength_scale: float  # Angstrom
    scale: float  # flux normalisation
    success: bool  # whether the likelihood fit converged (else the guess was used)

    def _kernel(self, t1: np.ndarray, w1: np.ndarray, t2: np.ndarray, w2: np.ndarray) -> np.ndarray:
        """The fitted kernel between points (t1, w1) and (t2, w2): (len(t1), len(t2))."""
        dt2 = (t1[:, None] - t2[None, :]) ** 2 / self.time_scale**2
        dw2 = (w1[:, None] - w2[None, :]) ** 2 / self.wavelength_scale**2
        return self.amplitude * _matern32(dt2 + dw2)[0]

    def _conditioned(self, times: np.ndarray, wavelengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The posterior mean at the query points (m,) and L^-1 K(train, query) (n, m)."""
        cross = self._kernel(self.t, self.wl, times, wavelengths)  # (n, m)
        return cross.T @ self.alpha, solve_triangular(self.chol, cross, lower=True, check_finite=False)

    def predict(self, times: np.ndarray, wavelengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the latent normalised flux at (times, wavelengths), both (m,)."""
        mean, v = self._conditioned(times, wavelengths)
        var = self.amplitude - np.einsum("nm,nm->m", v, v)
        return mean, np.sqrt(np.clip(var, 0.0, None))

    def sample(self, times: np.ndarray, wavelengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One joint draw of the latent normalised flux at (times, wavelengths) from the posterior, (m,): the mean
        plus L z, L the Cholesky factor of the posterior covariance (jittered when it is numerically singular, as
        it is at points next to precise observations); the mean alone if no jitter helps."""
        mean, v = self._conditioned(times, wavelengths)
        cov = self._kernel(times, wavelengths, times, wavelengths) - v.T @ v  # (m, m)
        chol = _cholesky(cov, np.full(len(times), 1e-6 * self.amplitude), self.amplitude)
        if chol is None:
            return mean
        return mean + chol @ rng.standard_normal(len(times))


def fit_gp(curve: Curve, wavelengths: Sequence[float], *, wavelength_scale: float = 6000.0) -> FittedGP:
    """Fit astronet's 2-D Matern-3/2 GP to a (trimmed) light curve by maximum likelihood on flux / scale."""
    wl_table = np.asarray(wavelengths, dtype=np.float64)
    ok = np.isfinite(curve.mjd) & np.isfinite(curve.flux) & np.isfinite(curve.flux_err) & (curve.flux_err > 0)
    if not ok.any():
        raise ValueError(f"light curve {curve.object_id!r} has no finite observation to fit")
    if curve.passband.min() < 0 or curve.passband.max() >= len(wl_table):
        raise ValueError(f"light curve {curve.object_id!r}: passband outside 0..{len(wl_table) - 1}")
    t = curve.mjd[ok].astype(np.float64)
    wl = wl_table[curve.passband[ok]]
    scale = flux_scale(curve.flux[ok], curve.flux_err[ok])
    y = curve.flux[ok] / scale  # (n,)
    noise = np.maximum(curve.flux_err[ok] / scale, 1e-8) ** 2  # (n,)
    dt2 = (t[:, None] - t[None, :]) ** 2  # (n, n)
    dw2 = (wl[:, None] - wl[None, :]) ** 2 / wavelength_scale**2  # (n, n)
    n = len(y)

    def neg_log_like(params: np.ndarray) -> tuple[float, np.ndarray]:
        amplitude, length2 = math.exp(params[0]), math.exp(params[1])
        scaled_dt2 = dt2 / length2
        shape, e = _matern32(scaled_dt2 + dw2)
        kernel = amplitude * shape
        chol = _cholesky(kernel, noise, amplitude)
        if chol is None:
            return 1e25, np.zeros(2)
        alpha = cho_solve((chol, True), y, check_finite=False)
        nll = 0.5 * y @ alpha + np.log(np.diag(chol)).sum() + 0.5 * n * math.log(2 * math.pi)
        inner = cho_solve((chol, True), np.eye(n), check_finite=False) - np.outer(alpha, alpha)  # (n, n)
        d_amplitude = kernel  # dK / dlog(amplitude)
        d_length = 1.5 * amplitude * e * scaled_dt2  # dK / dlog(length^2)
        grad = 0.5 * np.array([np.sum(inner * d_amplitude), np.sum(inner * d_length)])
        return float(nll), grad

    guess = np.array([math.log(0.25), 2.0 * math.log(GUESS_TIME_SCALE)])
    bounds = [(guess[0] - AMPLITUDE_BOUND, guess[0] + AMPLITUDE_BOUND),
              (2.0 * math.log(TIME_SCALE_BOUNDS[0]), 2.0 * math.log(TIME_SCALE_BOUNDS[1]))]
    result = minimize(neg_log_like, guess, jac=True, method="L-BFGS-B", bounds=bounds, tol=1e-6)
    # astronet keeps the guess when the optimiser reports failure; a failed run that still improved on the guess
    # (a line search giving up near the optimum, common in float64) is kept too.
    success = bool(result.success) and bool(np.all(np.isfinite(result.x)))
    params = result.x if success or (np.all(np.isfinite(result.x)) and result.fun < neg_log_like(guess)[0]) else guess
    amplitude, time_scale = math.exp(params[0]), math.exp(0.5 * params[1])
    kernel = amplitude * _matern32(dt2 / time_scale**2 + dw2)[0]
    chol = _cholesky(kernel, noise, amplitude)
    if chol is None:  # not reached for finite inputs (the last jitter dominates); keep the prior
        chol, y = np.diag(np.sqrt(noise + amplitude)), np.zeros_like(y)
    alpha = cho_solve((chol, True), y, check_finite=False)
    return FittedGP(t, wl, chol, alpha, amplitude, time_scale, wavelength_scale, scale, success)


def gp_grid(curve: Curve, wavelengths: Sequence[float], *, steps: int = 100, window_days: float = 50.0,
            wavelength_scale: float = 6000.0) -> Grid:
    """Trim, fit and read the GP on ``steps`` evenly spaced times from the first to the last kept observation, in
    every band (bands without observations are filled through the wavelength correlation)."""
    gp = fit_gp(trim(curve, window_days), wavelengths, wavelength_scale=wavelength_scale)
    start, stop = float(gp.t.min()), float(gp.t.max())
    times = np.linspace(start, stop, steps)  # (steps,)
    n_bands = len(wavelengths)
    query_t = np.tile(times, n_bands)  # (n_bands * steps,) band-major
    query_wl = np.repeat(np.asarray(wavelengths, dtype=np.float64), steps)
    mean, std = gp.predict(query_t, query_wl)
    mean = mean.reshape(n_bands, steps).T.astype(np.float32)  # (steps, n_bands)
    std = std.reshape(n_bands, steps).T.astype(np.float32)
    return Grid(times - start, mean, std, gp.scale)


_CONTROLLER: list[Any] = []


def one_blas_thread() -> AbstractContextManager[Any]:
    """A context in which numpy/scipy's BLAS runs on one thread. The GP's matrices are small: on a busy machine
    (a training process's own threads beside them) threaded BLAS made redrawing a light curve 4-8x slower."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return nullcontext()
    if not _CONTROLLER:  # building the controller lists the loaded libraries (milliseconds); limiting is cheap
        _CONTROLLER.append(ThreadpoolController())
    return cast(AbstractContextManager[Any], _CONTROLLER[0].limit(limits=1, user_api="blas"))


def fit_gps(curves: Sequence[Curve], wavelengths: Sequence[float], *, wavelength_scale: float = 6000.0,
            progress: bool = True) -> list[FittedGP]:
    """The GP of every light curve, fitted on all its observations (for resampled training views)."""
    fn = partial(fit_gp, wavelengths=tuple(wavelengths), wavelength_scale=wavelength_scale)
    with one_blas_thread():
        return list(_each_curve(fn, curves, "GP fits", workers=1, progress=progress))


def _each_curve(fn: Callable[[Curve], T], curves: Sequence[Curve], desc: str, *, workers: int,
                progress: bool) -> Iterator[T]:
    """``fn`` of every curve in order, in ``workers`` single-threaded processes when more than one, with a
    progress bar for more than 100 curves."""
    bar = None
    if progress and len(curves) > 100:
        from tqdm import tqdm

        bar = tqdm(total=len(curves), desc=desc, unit="curve")
    try:
        if workers > 1 and len(curves) > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded) as pool:
                chunk = max(1, len(curves) // (workers * 16))
                for result in pool.map(fn, curves, chunksize=chunk):
                    if bar is not None:
                        bar.update()
                    yield result
        else:
            for curve in curves:
                result = fn(curve)
                if bar is not None:
                    bar.update()
                yield result
    finally:
        if bar is not None:
            bar.close()


def _grid_mean(curve: Curve, wavelengths: Sequence[float], steps: int, window_days: float,
               wavelength_scale: float) -> np.ndarray:
    return gp_grid(curve, wavelengths, steps=steps, window_days=window_days, wavelength_scale=wavelength_scale).mean


def _single_threaded() -> None:
    """Worker initialiser: one BLAS thread per process (the matrices are small; several threads per worker
    oversubscribe the cores and made two workers slower than one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def gp_grids(curves: Sequence[Curve], wavelengths: Sequence[float], *, steps: int = 100, window_days: float = 50.0,
             wavelength_scale: float = 6000.0, workers: int = 1, progress: bool = True) -> np.ndarray:
    """GP mean grids of many light curves, (N, steps, n_bands) float32; ``workers`` > 1 fits them in processes."""
    fn = partial(_grid_mean, wavelengths=tuple(wavelengths), steps=steps, window_days=window_days,
                 wavelength_scale=wavelength_scale)
    out = np.empty((len(curves), steps, len(wavelengths)), dtype=np.float32)
    for i, grid in enumerate(_each_curve(fn, curves, "GP grids", workers=workers, progress=progress)):
        out[i] = grid
    return out
