"""Light curves: the PLAsTiCC layout (and the ZTF Bright Transient Survey in it), labels, splits, augmentation.

A light-curve table has one row per observation, ``object_id, mjd, passband, flux, flux_err`` (``detected``
optional: every row is then a detection), in CSV or Parquet; a metadata table has ``object_id`` and a label
(``type`` for the BTS, ``target`` for PLAsTiCC) and optionally ``redshift`` (``hostgal_specz`` /
``hostgal_photoz`` for PLAsTiCC). Rows are sorted by object and time, exact duplicate rows dropped, and every
row or object that is left out (bad values, no detections, no label, a class too small) is counted in the
:class:`ReadReport`, which the job prints: nothing is lost silently.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from shared import datapath
from shared.saved import SavedState

from .config import GROUPINGS, SURVEYS, TransientsConfig
from .curves import Curve
from .gp import FittedGP, fit_gps, one_blas_thread

LIGHT_CURVE_COLUMNS = ("object_id", "mjd", "passband", "flux", "flux_err")
REDSHIFT_COLUMNS = ("redshift", "hostgal_specz", "hostgal_photoz")


# ---------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class ReadReport:
    """What reading kept and left out, by reason (printed by the training job and logged)."""

    rows: int = 0
    duplicate_rows: int = 0
    bad_rows: int = 0  # non-finite mjd/flux/flux_err or flux_err <= 0
    objects: int = 0
    no_detections: list[str] = field(default_factory=list)
    no_valid_rows: list[str] = field(default_factory=list)  # every row of the object was bad
    no_label: list[str] = field(default_factory=list)
    unknown_label: Counter[str] = field(default_factory=Counter)  # labels the grouping does not place
    small_class: Counter[str] = field(default_factory=Counter)  # classes under min_class_objects
    truncated: int = 0  # objects cut to max_points
    kept: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.rows} rows of {self.objects} objects: {self.kept} objects kept"]
        if self.duplicate_rows:
            out.append(f"{self.duplicate_rows} duplicate rows dropped")
        if self.bad_rows:
            out.append(f"{self.bad_rows} rows with non-finite values or flux_err <= 0 dropped")
        for what, ids in (("no detection", self.no_detections), ("no valid row", self.no_valid_rows),
                          ("no label in the metadata", self.no_label)):
            if ids:
                shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
                out.append(f"{len(ids)} objects left out: {what} ({shown})")
        if self.unknown_label:
            out.append(f"{sum(self.unknown_label.values())} objects left out: label not in the grouping "
                       f"({dict(self.unknown_label)})")
        if self.small_class:
            out.append(f"{sum(self.small_class.values())} objects left out: class under min_class_objects "
                       f"({dict(self.small_class)})")
        if self.truncated:
            out.append(f"{self.truncated} objects cut to max_points observations")
        return out


def read_light_curves(path: str) -> pd.DataFrame:
    """The observations of a PLAsTiCC-layout file: object_id (str), mjd, passband (int), flux, flux_err, detected."""
    frame = datapath.read_table(path)
    missing = [c for c in LIGHT_CURVE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{datapath.name(path)}: missing columns {missing} (the PLAsTiCC layout: "
                         f"{', '.join(LIGHT_CURVE_COLUMNS)}[, detected])")
    out = pd.DataFrame({"object_id": frame["object_id"].astype(str),
                        "mjd": pd.to_numeric(frame["mjd"], errors="coerce"),
                        "passband": pd.to_numeric(frame["passband"], errors="coerce"),
                        "flux": pd.to_numeric(frame["flux"], errors="coerce"),
                        "flux_err": pd.to_numeric(frame["flux_err"], errors="coerce")})
    out["detected"] = frame["detected"].astype(bool) if "detected" in frame.columns else True
    return out


def find_metadata(path: str) -> str | None:
    """The metadata file beside a light-curve file, by name: ``*_lightcurves.*`` -> ``*_metadata.*``, else
    ``<stem>_metadata.<suffix>`` (PLAsTiCC's ``training_set.csv`` -> ``training_set_metadata.csv``)."""
    folder, _, filename = datapath.normalize(path).rpartition("/")
    stem, dot, suffix = filename.partition(".")
    candidates = [re.sub(r"light_?curves?", "metadata", stem, flags=re.IGNORECASE), f"{stem}_metadata"]
    for candidate in candidates:
        if candidate != stem:
            guess = f"{folder}/{candidate}{dot}{suffix}" if folder else f"{candidate}{dot}{suffix}"
            if datapath.exists(guess):
                return guess
    return None


def _number(value: Any) -> float:
    """A redshift cell as a number: BTS writes limits (``>9.854``) and ``-``, which are not redshifts."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return x if np.isfinite(x) and x >= 0 else float("nan")


def read_metadata(path: str, label_column: str = "auto") -> pd.DataFrame:
    """object_id (str), label (str) and redshift (float, NaN when unknown) of a metadata file."""
    frame = datapath.read_table(path)
    if "object_id" not in frame.columns:
        raise ValueError(f"{datapath.name(path)}: no object_id column")
    column = label_column
    if column == "auto":
        column = "type" if "type" in frame.columns else "target"
    if column not in frame.columns:
        raise ValueError(f"{datapath.name(path)}: no label column {column!r} (columns: {list(frame.columns)})")
    redshift = next((c for c in REDSHIFT_COLUMNS if c in frame.columns), None)
    return pd.DataFrame({
        "object_id": frame["object_id"].astype(str),
        "label": frame[column].astype(str),
        "redshift": frame[redshift].map(_number) if redshift else np.nan,
    }).drop_duplicates("object_id", keep="last")


def to_curves(frame: pd.DataFrame, report: ReadReport | None = None, max_points: int | None = None,
              redshift: Mapping[str, float] | None = None) -> list[Curve]:
    """One :class:`Curve` per object of an observation table: rows sorted, duplicates and bad rows dropped, objects
    without a detection left out (each counted in ``report``)."""
    report = report if report is not None else ReadReport()
    report.rows += len(frame)
    report.objects += int(frame["object_id"].nunique())
    all_ids = set(frame["object_id"].unique())
    dup = frame.duplicated()
    report.duplicate_rows += int(dup.sum())
    frame = frame[~dup]
    bad = ~(np.isfinite(frame["mjd"]) & np.isfinite(frame["flux"]) & np.isfinite(frame["flux_err"])
            & (frame["flux_err"] > 0) & np.isfinite(frame["passband"]))
    report.bad_rows += int(bad.sum())
    frame = frame[~bad].sort_values(["object_id", "mjd", "passband"], kind="stable")
    curves = []
    ids = frame["object_id"].to_numpy()
    columns = {c: frame[c].to_numpy() for c in ("mjd", "passband", "flux", "flux_err", "detected")}
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(ids)]
    for a, b in zip(starts, ends, strict=True):
        object_id = str(ids[a])
        detected = columns["detected"][a:b].astype(bool)
        if not detected.any():
            report.no_detections.append(object_id)
            continue
        z = redshift.get(object_id) if redshift is not None else None
        curve = Curve(object_id, columns["mjd"][a:b].astype(np.float64), columns["passband"][a:b].astype(np.int64),
                      columns["flux"][a:b].astype(np.float64), columns["flux_err"][a:b].astype(np.float64), detected,
                      None if z is None or not np.isfinite(z) else float(z))
        if max_points is not None and len(curve) > max_points:
            curve = curve.select(np.arange(max_points))
            report.truncated += 1
        curves.append(curve)
    report.no_valid_rows.extend(sorted(all_ids - set(ids.tolist())))
    return curves


def survey_for(passbands: set[int], survey: str) -> str:
    """The survey whose bands the passband indices name (``auto``: ZTF for 0-1, LSST for up to 0-5)."""
    if survey != "auto":
        return survey
    top = max(passbands) if passbands else 0
    if top <= 1:
        return "ztf"
    if top <= 5:
        return "lsst"
    raise ValueError(f"passband indices up to {top}: no known survey has that many bands")


def group_of(grouping: str, labels: Sequence[str]) -> dict[str, str]:
    """label -> class for ``grouping`` (``auto``: ztf_bts when the labels are BTS types; ``none``: itself)."""
    if grouping == "auto":
        bts = {t for members in GROUPINGS["ztf_bts"].values() for t in members}
        grouping = "ztf_bts" if set(labels) & bts else "none"
    if grouping == "none":
        return {label: label for label in labels}
    table = {member: group for group, members in GROUPINGS[grouping].items() for member in members}
    return {label: table[label] for label in labels if label in table}


def class_order(grouping: str, classes: set[str]) -> list[str]:
    """The classes in the grouping's own order (sorted, numerically when they are numbers, otherwise)."""
    for name in GROUPINGS:
        if grouping in ("auto", name) and classes <= set(GROUPINGS[name]):
            return [c for c in GROUPINGS[name] if c in classes]
    return sorted(classes, key=lambda c: (0, float(c), c) if _is_number(c) else (1, 0.0, c))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class LabelledCurves:
    curves: list[Curve]
    labels: np.ndarray  # (N,) int64 class index
    classes: list[str]
    survey: str
    name: str
    fingerprint: str
    report: ReadReport


def load_labelled(data: str, metadata: str | None, cfg: TransientsConfig, *,
                  classes: Sequence[str] | None = None) -> LabelledCurves:
    """The labelled light curves of ``data`` with their ``metadata``; ``classes`` (a trained model's) fixes the
    class list, and objects of other classes are left out and reported."""
    meta_path = metadata or find_metadata(data)
    if meta_path is None:
        raise FileNotFoundError(f"no metadata file beside {data}: pass --set metadata=PATH (object_id and a label)")
    meta = read_metadata(meta_path, cfg.label_column)
    report = ReadReport()
    frame = read_light_curves(data)
    curves = to_curves(frame, report, cfg.max_points, dict(zip(meta["object_id"], meta["redshift"], strict=True)))
    labels = dict(zip(meta["object_id"], meta["label"], strict=True))
    have = [c for c in curves if c.object_id in labels]
    report.no_label.extend(c.object_id for c in curves if c.object_id not in labels)
    mapping = group_of(cfg.grouping, sorted({labels[c.object_id] for c in have}))
    report.unknown_label.update(labels[c.object_id] for c in have if labels[c.object_id] not in mapping)
    have = [c for c in have if labels[c.object_id] in mapping]
    grouped = [mapping[labels[c.object_id]] for c in have]
    counts = Counter(grouped)
    if classes is None:
        small = {k for k, n in counts.items() if n < cfg.min_class_objects}
        chosen = class_order(cfg.grouping, set(counts) - small)
    else:
        chosen = list(classes)
        small = set(counts) - set(chosen)
    report.small_class.update({k: counts[k] for k in small})
    keep = [i for i, g in enumerate(grouped) if g in chosen]
    index = {c: i for i, c in enumerate(chosen)}
    kept = [have[i] for i in keep]
    report.kept = len(kept)
    if not kept:
        raise ValueError(f"{datapath.name(data)}: no labelled light curve left ({'; '.join(report.lines())})")
    passbands = {int(b) for c in kept for b in np.unique(c.passband)}
    return LabelledCurves(kept, np.array([index[grouped[i]] for i in keep], dtype=np.int64), chosen,
                          survey_for(passbands, cfg.survey), datapath.name(data),
                          datapath.fingerprint(data) + ":" + datapath.fingerprint(meta_path), report)


def split_objects(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test indices, stratified by class, by object (val and test each ``val_fraction``).
    A class with fewer than 3 objects goes to training only."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        n = len(members)
        n_held = int(round(val_fraction * n)) if n >= 3 else 0
        n_held = max(n_held, 1) if n >= 3 else 0
        parts[1].extend(members[:n_held].tolist())
        parts[2].extend(members[n_held:2 * n_held].tolist())
        parts[0].extend(members[2 * n_held:].tolist())
    train, val, test = (np.sort(np.array(p, dtype=np.int64)) for p in parts)
    return train, val, test


# ---------------------------------------------------------------------------------------------------------------
# synthetic light curves (the offline default and the tests)

# class -> (rise days, decline days, plateau days, colour g - r in mag at peak, colour drift per 10 days,
# peak absolute-ish magnitude spread): Bazin-like shapes whose timescales and colours differ by class
SYNTHETIC_CLASSES: dict[str, tuple[float, float, float, float, float]] = {
    "SN Ia": (4.0, 25.0, 0.0, -0.1, 0.35),
    "SN II": (3.0, 90.0, 60.0, 0.1, 0.15),
    "SN Ibc": (3.0, 18.0, 0.0, 0.3, 0.45),
    "SLSN": (18.0, 80.0, 0.0, -0.3, 0.1),
    "other": (1.0, 6.0, 0.0, -0.4, 0.0),
}


def _shape(t: np.ndarray, rise: float, decline: float, plateau: float) -> np.ndarray:
    """Bazin flux with an optional plateau (peak ~ 1 at t = 0)."""
    fall = np.where(t > plateau, (t - plateau) / decline, 0.0)
    return 2.0 * np.exp(-fall) / (1.0 + np.exp(-t / rise))


def synthetic_curves(n_objects: int, seed: int = 0,
                     weights: Sequence[float] = (0.55, 0.2, 0.1, 0.075, 0.075)) -> tuple[list[Curve], np.ndarray,
                                                                                               list[str]]:
    """``n_objects`` two-band (g, r) light curves of the five classes, with survey-like cadence: visits every 1-4
    days in nights of good weather, a seasonal gap, detections only above a noise floor. Returns curves, labels
    and class names."""
    rng = np.random.default_rng(seed)
    names = list(SYNTHETIC_CLASSES)
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    labels = rng.choice(len(names), size=n_objects, p=p)
    curves = []
    for i, k in enumerate(labels):
        rise, decline, plateau, colour, drift = SYNTHETIC_CLASSES[names[k]]
        rise *= rng.uniform(0.7, 1.4)
        decline *= rng.uniform(0.7, 1.4)
        plateau *= rng.uniform(0.5, 1.5)
        peak_mag = rng.uniform(16.5, 19.5)
        t0 = rng.uniform(-30, 10)  # peak relative to the first visit window
        span = rng.uniform(60, 250)
        nights = np.sort(np.cumsum(rng.uniform(1.0, 4.0, size=int(span))) - 30.0)
        nights = nights[nights < span]
        gap_start = rng.uniform(0, 400)
        nights = nights[~((nights > gap_start) & (nights < gap_start + 90))]
        visits = []
        for night in nights:
            for band in (0, 1):
                if rng.random() < 0.75:
                    visits.append((night + rng.uniform(0, 0.3) + 0.05 * band, band))
        if not visits:
            visits = [(0.0, 1)]
        times = np.array([v[0] for v in visits])
        bands = np.array([v[1] for v in visits], dtype=np.int64)
        t = times - t0
        shape = _shape(t, rise, decline, plateau)
        colour_t = colour + drift * np.clip(t, 0, None) / 10.0  # g - r grows as it cools
        mags = peak_mag - 2.5 * np.log10(np.clip(shape, 1e-6, None)) + np.where(bands == 0, colour_t, 0.0)
        flux = 10 ** (-0.4 * (mags - 27.5))
        err = np.sqrt(flux * 2.0 + (10 ** (-0.4 * (20.5 - 27.5)) * 0.2) ** 2)  # photon noise + a sky floor
        observed = flux + err * rng.normal(size=flux.shape)
        detected = observed / err > 5.0
        keep = detected  # alert photometry: detections only, as in the BTS file
        if not keep.any():
            keep[np.argmax(observed / err)] = True
            detected = keep.copy()
        mjd = 58500.0 + rng.uniform(0, 700) + times
        curves.append(Curve(f"synthetic-{i:05d}", mjd[keep], bands[keep], observed[keep], err[keep], detected[keep],
                            float(rng.uniform(0.01, 0.15))))
    return curves, labels.astype(np.int64), names


# ---------------------------------------------------------------------------------------------------------------
# state, augmentation and the datasets


@dataclass(frozen=True)
class TransientsState(SavedState):
    """What a classifier keeps from its data: classes, bands, the split and the calibration fitted on validation."""

    data: str
    fingerprint: str
    classes: tuple[str, ...]
    survey: str
    bands: tuple[str, ...]
    wavelengths: tuple[float, ...]
    objects: dict[str, tuple[str, ...]]  # train / val / test object ids
    class_counts: tuple[int, ...]  # training objects per class
    temperature: float = 1.0  # softmax temperature fitted on validation (1: not calibrated)
    ood_threshold: float | None = None  # the OOD score above which 95 % of validation objects fall below


def band_info(survey: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    info = SURVEYS[survey]
    return tuple(info["bands"]), tuple(float(w) for w in info["wavelengths"])


def _truncation_k(n_det: int, cfg: TransientsConfig, rng: np.random.Generator) -> int:
    """How many detections a truncated view keeps: in [min_detections, n_det], uniform or log-uniform."""
    low = min(cfg.min_detections, n_det)
    if cfg.truncate_k == "log":
        return int(min(n_det, np.floor(np.exp(rng.uniform(np.log(low), np.log(n_det + 1))))))
    return int(rng.integers(low, n_det + 1))


def resample(curve: Curve, gp: FittedGP, wavelengths: Sequence[float], time_jitter: float,
             rng: np.random.Generator) -> Curve:
    """The light curve redrawn from its Gaussian process (avocado's augmentation, without the redshift shift):
    every observation moved in time by up to ``time_jitter`` days (uniform), the fluxes there one joint draw from
    the GP posterior plus noise from each point's own error; bands, errors and detection flags stay."""
    t = curve.mjd + rng.uniform(-time_jitter, time_jitter, len(curve))
    order = np.argsort(t, kind="stable")
    t, band, err = t[order], curve.passband[order], curve.flux_err[order]
    wl = np.asarray(wavelengths, dtype=np.float64)[band]
    flux = gp.sample(t, wl, rng) * gp.scale + err * rng.standard_normal(len(t))
    return Curve(curve.object_id, t, band, flux, err, curve.detected[order], curve.redshift)


def augment(curve: Curve, cfg: TransientsConfig, rng: np.random.Generator, gp: FittedGP | None = None,
            wavelengths: Sequence[float] = ()) -> Curve:
    """A training view of ``curve`` as an alert stream would deliver it: with ``gp``, redrawn from it with
    probability ``gp_resample_prob`` (:func:`resample`), then cut after its k-th detection (k uniform, or
    log-uniform so that the first few detections are common), points and a band dropped, flux perturbed by its
    errors (a redrawn view has its noise already). At least one detection always stays."""
    redrawn = False
    if gp is not None and cfg.gp_resample_prob > 0 and rng.random() < cfg.gp_resample_prob:
        curve, redrawn = resample(curve, gp, wavelengths, cfg.gp_time_jitter, rng), True
    if cfg.truncate_prob and rng.random() < cfg.truncate_prob:
        n_det = int(curve.detected.sum())
        if n_det > cfg.min_detections:
            curve = curve.first_detections(_truncation_k(n_det, cfg, rng))
    keep = np.ones(len(curve), dtype=bool)
    if cfg.drop_point_prob:
        keep &= rng.random(len(curve)) >= cfg.drop_point_prob
    bands = np.unique(curve.passband)
    if cfg.drop_band_prob and len(bands) > 1 and rng.random() < cfg.drop_band_prob:
        keep &= curve.passband != rng.choice(bands)
    if not (keep & curve.detected).any():
        keep[np.flatnonzero(curve.detected)[0]] = True
    curve = curve.select(keep)
    if cfg.flux_noise and not redrawn:
        noisy = curve.flux + cfg.flux_noise * curve.flux_err * rng.normal(size=len(curve))
        curve = Curve(curve.object_id, curve.mjd, curve.passband, noisy, curve.flux_err, curve.detected,
                      curve.redshift)
    return curve


# Per observation (N_VALUES): flux / scale, flux_err / scale (scale: the peak of the visible detections),
# asinh(flux / FLUX_SOFT) (brightness on a fixed, survey-wide scale), asinh of the signal-to-noise, detected,
# flux over the brightest flux seen so far (rising: 1, fading: < 1), log days since the previous observation in
# the same band (0 for a band's first), a band's-first flag, signed log days from the brightest visible point,
# log days since the first detection, the colour to the nearest observation in another band and the log days
# to it. Per object (N_GLOBALS): log10 of the scale (centred), redshift (0 when not used or unknown), log of the
# number of detections and of the days they span (how far along its alert stream the light curve is).
N_VALUES = 12
N_GLOBALS = 4
COLOUR_NONE_DAYS = 1000.0  # the gap written when no other band is seen
REDSHIFT_GLOBAL = 1  # the index of the redshift in the globals (masked when it is not used)
FLUX_SCALE_CENTRE = 4.0  # log10 flux at magnitude 17.5 with zero point 27.5
FLUX_SOFT = 1000.0  # asinh(flux / FLUX_SOFT): flux at magnitude 20 with zero point 27.5
VALUE_CLIP = 10.0


def _slog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _colour(t: np.ndarray, band: np.ndarray, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per observation: the magnitude difference to the nearest-in-time observation in another band (its band
    minus the other, in magnitudes / 2) and the log days to it (COLOUR_NONE_DAYS when no other band is seen).
    Ties go to the earlier observation (its index)."""
    n = len(t)
    mag = -2.5 * np.log10(np.maximum(flux, 1e-6))
    distance = np.abs(t[:, None] - t[None, :])  # (n, n): one product for all bands, not one per band
    distance[band[:, None] == band[None, :]] = np.inf
    nearest = np.argmin(distance, axis=1)
    other = np.isfinite(distance[np.arange(n), nearest])  # some observation in another band exists
    colour = np.where(other, (mag - mag[nearest]) / 2.0, 0.0)
    gap = np.where(other, np.log1p(np.abs(t - t[nearest])) / 3.0, np.log1p(COLOUR_NONE_DAYS) / 3.0)
    return colour, gap


def _scale_and_start(curve: Curve) -> tuple[float, float]:
    """The flux scale (peak |flux| of the detections) and the time of the first detection (days)."""
    det = curve.detected
    seen = curve.flux[det] if det.any() else curve.flux
    return max(float(np.max(np.abs(seen))), 1e-6), float(curve.mjd[det][0] if det.any() else curve.mjd[0])


def object_globals(curve: Curve, use_redshift: bool) -> np.ndarray:
    """Per object (N_GLOBALS): log10 of the flux scale (centred), redshift (0 when not used or unknown), log of
    the number of detections and of the days they span."""
    scale, t0 = _scale_and_start(curve)
    det = curve.detected
    redshift = curve.redshift if (use_redshift and curve.redshift is not None) else 0.0
    span = float(curve.mjd[det][-1] - t0) if det.any() else 0.0
    return np.array([np.log10(scale) - FLUX_SCALE_CENTRE, redshift, np.log1p(int(det.sum())) / 3.0 - 1.0,
                     np.log1p(span) / 3.0 - 1.0], dtype=np.float32)


def n_curve_features(n_bands: int) -> int:
    """Width of :func:`curve_features` for ``n_bands`` bands: each baseline feature and its missing flag."""
    from .baseline import feature_names

    return 2 * len(feature_names(n_bands))


def curve_features(curves: Sequence[Curve], n_bands: int) -> np.ndarray:
    """The feature baseline's light-curve features of ``curves`` (the `light-curve` package's Bazin and linear
    fits, amplitude, variability statistics, per band; colours and peak-time differences; rise and decline) as
    extra global inputs of the `native` model (N, n_curve_features): each signed-log scaled and clipped, then a
    flag per feature that is 1 where it could not be computed (too few points; its value is then 0)."""
    from .baseline import extract_features

    raw = extract_features(curves, n_bands).astype(np.float64)  # (N, F), NaN where undefined
    missing = ~np.isfinite(raw)
    scaled = np.clip(_slog(np.where(missing, 0.0, raw)) / 3.0, -VALUE_CLIP, VALUE_CLIP)
    return np.concatenate([scaled, missing], axis=1).astype(np.float32)


def tokens(curve: Curve, use_redshift: bool, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The `native` model's input of one light curve: per observation its time since the first detection
    (days), band index and scaled values (N_VALUES); per object its global features (N_GLOBALS, then
    ``features``, its :func:`curve_features` row, when the model takes them)."""
    det = curve.detected
    flux, err, t = curve.flux, curve.flux_err, curve.mjd
    scale, t0 = _scale_and_start(curve)
    t_peak = float(t[det][np.argmax(flux[det])]) if det.any() else float(t[np.argmax(flux)])
    # per band, in the curve's order: days since the band's previous observation, and its first observation
    order = np.argsort(curve.passband, kind="stable")
    in_order = curve.passband[order]
    first = np.ones(len(curve), dtype=bool)
    first[1:] = in_order[1:] != in_order[:-1]
    since_prev = np.zeros(len(curve))
    later = ~first[1:]
    since_prev[order[1:][later]] = (t[order[1:]] - t[order[:-1]])[later]
    first_in_band = np.zeros(len(curve))
    first_in_band[order[first]] = 1.0
    brightest = np.maximum.accumulate(np.maximum(flux, 1e-6))
    colour, colour_gap = _colour(t, curve.passband, np.maximum(flux, err))
    values = np.stack([flux / scale, err / scale, np.arcsinh(flux / FLUX_SOFT) / 3.0, np.arcsinh(flux / err) / 3.0,
                       det.astype(np.float64), flux / brightest, np.log1p(since_prev) / 3.0, first_in_band,
                       _slog(t - t_peak) / 4.0, _slog(t - t0) / 4.0, colour, colour_gap], axis=1)  # (n, N_VALUES)
    return {"time": (t - t0).astype(np.float32), "band": curve.passband.astype(np.int64),
            "values": np.clip(values, -VALUE_CLIP, VALUE_CLIP).astype(np.float32),
            "globals": object_globals(curve, use_redshift) if features is None
            else np.concatenate([object_globals(curve, use_redshift), features]).astype(np.float32)}


class CurveDataset(Dataset[dict[str, Any]]):
    """Tokenized light curves with their labels; ``train`` augments each access."""

    def __init__(self, curves: Sequence[Curve], labels: np.ndarray, cfg: TransientsConfig, train: bool = False,
                 n_bands: int = 2, wavelengths: Sequence[float] = ()) -> None:
        self.curves, self.labels, self.cfg, self.train = list(curves), labels, cfg, train
        self.n_bands, self.wavelengths = n_bands, tuple(wavelengths)
        # each training curve's GP, fitted once, when training views are redrawn from it
        self.gps: list[FittedGP] | None = None
        if train and cfg.gp_resample_prob > 0:
            if len(self.wavelengths) != n_bands:
                raise ValueError(f"gp_resample_prob > 0 needs the {n_bands} bands' wavelengths")
            self.gps = fit_gps(self.curves, self.wavelengths, wavelength_scale=cfg.gp_wavelength_scale)
        # the features of unaugmented curves are computed once; a training view's are computed per access
        self.features: np.ndarray | None = None
        if cfg.lc_features and not train:
            self.features = curve_features(self.curves, n_bands)

    def __len__(self) -> int:
        return len(self.curves)

    def __getitem__(self, index: int) -> dict[str, Any]:
        curve = self.curves[index]
        if self.train:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))  # follows torch's seed
            with nullcontext() if self.gps is None else one_blas_thread():
                curve = augment(curve, self.cfg, rng, None if self.gps is None else self.gps[index], self.wavelengths)
        features = None
        if self.cfg.lc_features:
            features = self.features[index] if self.features is not None else curve_features([curve], self.n_bands)[0]
        return {**tokens(curve, self.cfg.use_redshift, features), "label": int(self.labels[index])}


class GridDataset(Dataset[dict[str, Any]]):
    """t2's input: Gaussian-process grids (steps, n_bands) precomputed per light curve, and global features."""

    def __init__(self, grids: np.ndarray, globals_: np.ndarray, labels: np.ndarray) -> None:
        self.grids, self.globals, self.labels = grids, globals_, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"grid": self.grids[index], "globals": self.globals[index], "label": int(self.labels[index])}


@dataclass
class Batch:
    """A batch of tokenized light curves, packed (tokens of every curve back to back, ``cu_seqlens`` marking
    where each starts) or padded to the longest (``mask`` True = a real token)."""

    time: Tensor  # packed (T,) / padded (B, L) float32
    band: Tensor  # (T,) / (B, L) int64
    values: Tensor  # (T, N_VALUES) / (B, L, N_VALUES)
    globals: Tensor  # (B, N_GLOBALS [+ n_curve_features])
    labels: Tensor  # (B,) int64
    cu_seqlens: Tensor | None = None  # (B + 1,) int32 when packed
    max_seqlen: int = 0
    mask: Tensor | None = None  # (B, L) bool when padded

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device: torch.device) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(self.time.to(device), self.band.to(device), self.values.to(device), self.globals.to(device),
                     self.labels.to(device), move(self.cu_seqlens), self.max_seqlen, move(self.mask))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def collate_packed(items: Sequence[Mapping[str, Any]]) -> Batch:
    lengths = torch.tensor([len(it["time"]) for it in items], dtype=torch.int32)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return Batch(torch.from_numpy(np.concatenate([it["time"] for it in items])),
                 torch.from_numpy(np.concatenate([it["band"] for it in items])),
                 torch.from_numpy(np.concatenate([it["values"] for it in items])),
                 torch.from_numpy(np.stack([it["globals"] for it in items])),
                 torch.tensor([it["label"] for it in items], dtype=torch.int64), cu, int(lengths.max()))


def collate_padded(items: Sequence[Mapping[str, Any]]) -> Batch:
    longest = max(len(it["time"]) for it in items)
    batch = len(items)
    time = np.zeros((batch, longest), dtype=np.float32)
    band = np.zeros((batch, longest), dtype=np.int64)
    values = np.zeros((batch, longest, N_VALUES), dtype=np.float32)
    mask = np.zeros((batch, longest), dtype=bool)
    for i, it in enumerate(items):
        n = len(it["time"])
        time[i, :n], band[i, :n], values[i, :n], mask[i, :n] = it["time"], it["band"], it["values"], True
    return Batch(torch.from_numpy(time), torch.from_numpy(band), torch.from_numpy(values),
                 torch.from_numpy(np.stack([it["globals"] for it in items])),
                 torch.tensor([it["label"] for it in items], dtype=torch.int64), mask=torch.from_numpy(mask),
                 max_seqlen=longest)


def collate_grids(items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    return {"grid": torch.from_numpy(np.stack([it["grid"] for it in items])),
            "globals": torch.from_numpy(np.stack([it["globals"] for it in items])),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64)}
