"""The light-curve feature baseline: feature table shape and NaNs, and a fit that separates two shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.transients.baseline import FeatureBaseline, extract_features, feature_names
from services.transients.curves import Curve

ZTF = Path("/work/shared/data/transients/ztf_bts_lightcurves.csv")


def bazin(t: np.ndarray, t0: float, rise: float, fall: float) -> np.ndarray:
    return np.exp(-(t - t0) / fall) / (1.0 + np.exp(-(t - t0) / rise))


def synthetic(rng: np.random.Generator, slow: bool, index: int, n: int = 30) -> Curve:
    """A two-band Bazin transient: fast (rise 2 d, fall 10 d) or slow (rise 8 d, fall 60 d)."""
    mjd = np.sort(rng.uniform(-20.0, 80.0, n))
    passband = rng.integers(0, 2, n)
    rise, fall = (8.0, 60.0) if slow else (2.0, 10.0)
    amplitude = rng.uniform(500.0, 5000.0) * np.where(passband == 0, 1.0, 0.8)
    flux_err = 0.03 * amplitude + 10.0
    flux = amplitude * bazin(mjd, rng.uniform(-5.0, 5.0), rise, fall) + flux_err * rng.normal(size=n)
    return Curve(f"obj{index}", mjd, passband.astype(np.int64), flux, flux_err, flux > 3 * flux_err)


def test_feature_shape_and_names() -> None:
    rng = np.random.default_rng(0)
    curves = [synthetic(rng, bool(i % 2), i) for i in range(6)]
    for n_bands in (1, 2, 6):
        names = feature_names(n_bands)
        features = extract_features(curves, n_bands)
        assert features.shape == (6, len(names)) and features.dtype == np.float32
        assert len(set(names)) == len(names)
    features = extract_features(curves, 2)
    names = feature_names(2)
    assert np.isfinite(features[:, names.index("b0_b1_peak_log_ratio")]).all()
    assert np.isfinite(features[:, names.index("obj_duration")]).all()
    assert not np.isinf(features).any()


def test_sparse_band_is_nan_not_error() -> None:
    """One point in band 1, none in band 2 (and a repeated time in band 0): NaN where nothing can be computed."""
    t = np.array([0.0, 2.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 5.0])
    order = np.argsort(t, kind="stable")
    passband = np.array([0] * 9 + [1])[order]
    flux = np.array([1, 5, 6, 9, 8, 7, 5, 4, 3, 6.0])[order] * 100.0
    curve = Curve("sparse", t[order], passband, flux, np.full(10, 20.0), np.ones(10, bool))
    names = feature_names(3)
    row = dict(zip(names, extract_features([curve], 3)[0], strict=True))
    assert np.isfinite(row["b0_bazin_fit_amplitude"]) and np.isfinite(row["b0_kurtosis"])
    assert row["b1_n_points"] == 1 and np.isfinite(row["b1_log_peak_flux"])
    assert np.isnan(row["b1_bazin_fit_amplitude"]) and np.isnan(row["b1_skew"]) and np.isnan(row["b1_stetson_K"])
    assert row["b2_n_points"] == 0
    assert all(np.isnan(v) for k, v in row.items() if k.startswith("b2_") and k != "b2_n_points")
    assert np.isnan(row["b1_b2_peak_log_ratio"]) and np.isfinite(row["b0_b1_peak_log_ratio"])
    empty = Curve("empty", np.zeros(0), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0, bool))
    assert extract_features([empty], 3).shape == (1, len(names))


def test_fit_separates_fast_and_slow() -> None:
    rng = np.random.default_rng(1)
    labels = np.arange(160) % 2
    curves = [synthetic(rng, bool(label), i) for i, label in enumerate(labels)]
    model = FeatureBaseline(n_classes=3, n_bands=2, seed=0).fit(curves[:100], labels[:100])  # class 2 never seen
    proba = model.predict_proba(curves[100:])
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert (proba[:, 2] == 0).all()
    assert (proba.argmax(axis=1) == labels[100:]).mean() > 0.85
    again = FeatureBaseline(n_classes=3, n_bands=2, seed=0).fit(curves[:100], labels[:100])
    np.testing.assert_array_equal(again.predict_proba(curves[100:]), proba)
    assert "LightGBM" in model.name
    early = FeatureBaseline(n_classes=3, n_bands=2, seed=0, train_cuts=(3, 5)).fit(curves[:100], labels[:100])
    cut = early.predict_proba([c.first_detections(5) for c in curves[100:]])
    assert cut.shape == (60, 3) and (cut.argmax(axis=1) == labels[100:]).mean() > 0.6


@pytest.mark.data
@pytest.mark.skipif(not ZTF.exists(), reason="ZTF BTS light curves not present")
def test_real_ztf_features() -> None:
    import pandas as pd

    table = pd.read_csv(ZTF).sort_values(["object_id", "mjd"], kind="stable")
    curves = []
    for object_id, group in table.groupby("object_id", sort=True):
        curves.append(Curve(str(object_id), group.mjd.to_numpy(float), group.passband.to_numpy(np.int64),
                            group.flux.to_numpy(float), group.flux_err.to_numpy(float),
                            group.detected.to_numpy(bool)))
        if len(curves) == 100:
            break
    features = extract_features(curves, 2)
    names = feature_names(2)
    assert features.shape == (100, len(names)) and not np.isinf(features).any()
    obj = [i for i, name in enumerate(names) if name.startswith("obj_")]
    assert np.isfinite(features[:, obj]).all()
    for band in (0, 1):
        enough = np.array([len(np.unique(c.mjd[c.passband == band])) >= 6 for c in curves])
        column = features[:, names.index(f"b{band}_bazin_fit_amplitude")]
        assert np.isfinite(column[enough]).all() and np.isnan(column[~enough]).all()
