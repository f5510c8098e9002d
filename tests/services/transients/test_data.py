"""Reading the PLAsTiCC layout (and the ZTF BTS set in it), grouping, splits, augmentation and tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.transients.config import TransientsConfig
from services.transients.curves import Curve
from services.transients.data import (
    augment,
    collate_packed,
    collate_padded,
    find_metadata,
    group_of,
    load_labelled,
    resample,
    split_objects,
    synthetic_curves,
    tokens,
)

DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "transients"


def _write(tmp_path: Path, rows: list[tuple], meta: list[tuple], suffix: str = ".csv") -> Path:
    lc = pd.DataFrame(rows, columns=["object_id", "mjd", "passband", "flux", "flux_err", "detected"])
    md = pd.DataFrame(meta, columns=["object_id", "type", "redshift"]).astype({"redshift": str})
    path = tmp_path / f"survey_lightcurves{suffix}"
    if suffix == ".parquet":
        lc.to_parquet(path)
        md.to_parquet(tmp_path / "survey_metadata.parquet")
    else:
        lc.to_csv(path, index=False)
        md.to_csv(tmp_path / "survey_metadata.csv", index=False)
    return path


ROWS = [("b", 3.0, 1, 20.0, 1.0, 1), ("a", 2.0, 0, 5.0, 1.0, 1), ("a", 1.0, 1, 3.0, 1.0, 1),
        ("a", 1.0, 1, 3.0, 1.0, 1),  # an exact duplicate
        ("b", 1.0, 0, 10.0, 1.0, 1), ("c", 1.0, 0, 1.0, 1.0, 0),  # c: no detection
        ("d", 1.0, 0, np.nan, 1.0, 1), ("e", 5.0, 1, 4.0, -1.0, 1), ("f", 1.0, 1, 7.0, 1.0, 1)]
META = [("a", "SN Ia-91T", 0.05), ("b", "SN IIn", ">9.8"), ("c", "SN Ia", "-"), ("d", "SN Ic", 0.1),
        ("e", "TDE", 0.0)]  # f has no label


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_rows_are_sorted_duplicates_dropped_and_every_left_out_object_reported(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path, ROWS, META, suffix)
    assert find_metadata(str(path)) == str(tmp_path / f"survey_metadata{suffix}")
    cfg = TransientsConfig(data=str(path), min_class_objects=1)
    labelled = load_labelled(str(path), None, cfg)
    by_id = {c.object_id: c for c in labelled.curves}
    assert sorted(by_id) == ["a", "b"]
    assert by_id["a"].mjd.tolist() == [1.0, 2.0] and by_id["a"].passband.tolist() == [1, 0]  # sorted, deduplicated
    assert by_id["a"].redshift == 0.05 and by_id["b"].redshift is None  # ">9.8" is a limit, not a redshift
    assert labelled.classes == ["SN Ia", "SN II"] and labelled.labels.tolist() == [0, 1]  # grouped BTS types
    report = labelled.report
    assert report.duplicate_rows == 1 and report.bad_rows == 2
    assert report.no_detections == ["c"] and sorted(report.no_valid_rows) == ["d", "e"] and report.no_label == ["f"]
    text = "\n".join(report.lines())
    assert "1 duplicate rows" in text and "no detection (c)" in text and "no label in the metadata (f)" in text


def test_missing_columns_and_missing_metadata_say_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv"
    pd.DataFrame({"object_id": [1], "mjd": [1.0]}).to_csv(bad, index=False)
    cfg = TransientsConfig(data=str(bad))
    with pytest.raises(FileNotFoundError, match="no metadata file"):
        load_labelled(str(bad), None, cfg)
    pd.DataFrame({"object_id": [1], "target": [90]}).to_csv(tmp_path / "x_metadata.csv", index=False)
    with pytest.raises(ValueError, match="missing columns"):
        load_labelled(str(bad), None, cfg)


def test_small_classes_are_left_out_and_reported(tmp_path: Path) -> None:
    rows = [(f"o{i}", 1.0, 0, 5.0, 1.0, 1) for i in range(5)]
    meta = [(f"o{i}", "SN Ia" if i < 4 else "SLSN-I", 0.1) for i in range(5)]
    labelled = load_labelled(str(_write(tmp_path, rows, meta)), None, TransientsConfig(min_class_objects=2))
    assert labelled.classes == ["SN Ia"] and labelled.report.small_class == {"SLSN": 1}


def test_grouping_places_every_bts_type_of_the_issue() -> None:
    mapping = group_of("ztf_bts", ["SN Iax", "SN II-pec", "SN Icn", "SLSN-II", "Ca-rich", "LRN", "unheard-of"])
    assert mapping == {"SN Iax": "SN Ia", "SN II-pec": "SN II", "SN Icn": "SN Ibc", "SLSN-II": "SLSN",
                       "Ca-rich": "other", "LRN": "other"}
    assert group_of("auto", ["90", "42"]) == {"90": "90", "42": "42"}  # PLAsTiCC targets: each its own class


def test_splits_are_stratified_by_class_and_disjoint() -> None:
    labels = np.array([0] * 100 + [1] * 20 + [2] * 3 + [3] * 2)
    train, val, test = split_objects(labels, 0.15, seed=0)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert len(train) + len(val) + len(test) == len(labels)
    assert np.bincount(labels[val], minlength=4).tolist() == [15, 3, 1, 0]  # a 2-object class trains only
    assert np.bincount(labels[test], minlength=4).tolist() == [15, 3, 1, 0]


def test_augmentation_keeps_a_detection_and_follows_its_settings() -> None:
    curves, _, _ = synthetic_curves(30, seed=1)
    cfg = TransientsConfig(truncate_prob=1.0, drop_point_prob=0.5, drop_band_prob=1.0)
    rng = np.random.default_rng(0)
    for curve in curves:
        view = augment(curve, cfg, rng)
        assert view.detected.any() and len(view) <= len(curve)
        assert set(view.mjd.tolist()) <= set(curve.mjd.tolist())
    plain = augment(curves[0], TransientsConfig(truncate_prob=0, drop_point_prob=0, drop_band_prob=0, flux_noise=0),
                    rng)
    assert np.array_equal(plain.flux, curves[0].flux)


def test_first_detections_is_what_was_known_then() -> None:
    curve = Curve("x", np.arange(6.0), np.zeros(6, dtype=np.int64), np.ones(6), np.ones(6),
                  np.array([False, True, False, True, True, True]))
    early = curve.first_detections(2)
    assert early.mjd.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_tokens_and_the_two_collates_hold_the_same_observations() -> None:
    curves, labels, _ = synthetic_curves(5, seed=2)
    items = [{**tokens(c, use_redshift=False), "label": int(k)} for c, k in zip(curves, labels, strict=True)]
    first = items[0]
    det = curves[0].detected
    assert first["time"][np.flatnonzero(det)[0]] == 0.0  # days since the first detection
    assert np.isclose(np.abs(first["values"][det, 0]).max(), 1.0)  # flux over the peak detection
    assert first["globals"][1] == 0.0  # no redshift unless asked
    packed, padded = collate_packed(items), collate_padded(items)
    assert packed.cu_seqlens is not None and padded.mask is not None
    lengths = [len(c) for c in curves]
    assert packed.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert padded.mask.sum(1).tolist() == lengths
    assert np.array_equal(padded.values[padded.mask].numpy(), packed.values.numpy())


@pytest.mark.data
@pytest.mark.skipif(not (DATA / "ztf_bts_lightcurves.csv").exists(), reason="the ZTF BTS set is not here")
def test_the_ztf_bright_transient_survey_reads_into_five_classes() -> None:
    path = str(DATA / "ztf_bts_lightcurves.csv")
    labelled = load_labelled(path, None, TransientsConfig(data=path))
    assert labelled.survey == "ztf" and len(labelled.curves) == 2171 and labelled.report.duplicate_rows == 136
    assert np.bincount(labelled.labels).tolist() == [1599, 382, 130, 31, 29]
    plasticc = str(DATA / "plasticc_sample_training_set.csv")
    sample = load_labelled(plasticc, None, TransientsConfig(data=plasticc, min_class_objects=1))
    assert sample.survey == "lsst" and len(sample.curves) == 10 and sample.classes == ["42", "65", "88", "90", "92"]


def test_gp_resampled_views_keep_the_bands_and_follow_the_curve() -> None:
    from services.transients.gp import fit_gp

    curve = synthetic_curves(20, seed=4)[0][0]
    wavelengths = (4746.48, 6366.38)
    gp = fit_gp(curve, wavelengths)
    rng = np.random.default_rng(1)
    view = resample(curve, gp, wavelengths, 1.0, rng)
    assert len(view) == len(curve) and np.all(np.diff(view.mjd) >= 0)
    assert np.all(np.abs(np.sort(view.mjd) - np.sort(curve.mjd)) <= 1.0 + 1e-9)
    assert sorted(view.passband.tolist()) == sorted(curve.passband.tolist())
    assert view.detected.sum() == curve.detected.sum()
    # the redrawn fluxes follow the light curve: within a few errors of it, and not equal to it
    near = np.abs(view.flux - np.interp(view.mjd, curve.mjd, curve.flux)) / view.flux_err
    assert np.median(near) < 3 and not np.allclose(view.flux, curve.flux)
    # augment redraws with gp_resample_prob and only then; without a GP it never does
    cfg = TransientsConfig(gp_resample_prob=1.0, truncate_prob=0.0, drop_point_prob=0.0, drop_band_prob=0.0)
    assert not np.array_equal(augment(curve, cfg, np.random.default_rng(2), gp, wavelengths).mjd, curve.mjd)
    assert np.array_equal(augment(curve, cfg, np.random.default_rng(2)).mjd, curve.mjd)
    off = TransientsConfig(gp_resample_prob=0.0, truncate_prob=0.0, drop_point_prob=0.0, drop_band_prob=0.0)
    assert np.array_equal(augment(curve, off, np.random.default_rng(2), gp, wavelengths).mjd, curve.mjd)
    with pytest.raises(ValueError, match="gp_resample_prob"):
        TransientsConfig(model="t2", gp_resample_prob=0.5)


def _per_band_reference(t: np.ndarray, band: np.ndarray, flux: np.ndarray) -> tuple[np.ndarray, ...]:
    """The per-band loops that tokens' since-previous, first-in-band and colour columns were first written with
    (one numpy pass per band): the faster code must give exactly these."""
    n = len(t)
    since_prev, first_in_band = np.zeros(n), np.zeros(n)
    colour, gap = np.zeros(n), np.full(n, np.log1p(1000.0) / 3.0)
    mag = -2.5 * np.log10(np.maximum(flux, 1e-6))
    for b in np.unique(band):
        idx, other = np.flatnonzero(band == b), np.flatnonzero(band != b)
        since_prev[idx[1:]] = np.diff(t[idx])
        first_in_band[idx[0]] = 1.0
        if len(other):
            nearest = other[np.argmin(np.abs(t[idx, None] - t[None, other]), axis=1)]
            colour[idx] = (mag[idx] - mag[nearest]) / 2.0
            gap[idx] = np.log1p(np.abs(t[idx] - t[nearest])) / 3.0
    return since_prev, first_in_band, colour, gap


@pytest.mark.parametrize("seed", range(6))
def test_tokens_per_band_columns_are_those_of_the_per_band_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n, bands in [(1, 1), (2, 2), (7, 1), (40, 6), (120, 3)]:
        t = np.sort(rng.choice(np.arange(0.0, 60.0, 0.5), size=n))  # repeated times: ties between bands
        band = rng.integers(0, bands, size=n)
        flux = rng.normal(50.0, 80.0, size=n)
        err = rng.uniform(1.0, 20.0, size=n)
        curve = Curve("x", t, band, flux, err, flux > 0 if (flux > 0).any() else np.ones(n, dtype=bool))
        values = tokens(curve, use_redshift=False)["values"]
        since_prev, first_in_band, colour, gap = _per_band_reference(t, band, np.maximum(flux, err))
        expected = np.clip(np.stack([np.log1p(since_prev) / 3.0, first_in_band, colour, gap], axis=1), -10, 10)
        np.testing.assert_array_equal(values[:, [6, 7, 10, 11]], expected.astype(np.float32))
