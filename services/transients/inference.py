"""Classifying light curves with a loaded model: checks, batching, calibrated probabilities and the OOD score.

The service, the pyfunc model, ``tessera predict`` and the evaluation share these functions, so a request is
checked and answered the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from shared.errors import RequestError

from .curves import Curve
from .data import collate_grids, collate_packed, curve_features, object_globals, tokens
from .training import decide, ood_scores

MAX_OBJECTS = 256  # objects per request
CHUNK = 256  # objects per model call


def check_object(index: int, object_id: str | None, mjd: Sequence[float], passband: Sequence[Any],
                 flux: Sequence[float], flux_err: Sequence[float], bands: Sequence[str], max_points: int,
                 redshift: float | None = None, detected: Sequence[bool] | None = None) -> Curve:
    """One object of a request as a :class:`Curve`, or a RequestError naming the object and what is wrong.
    ``passband`` holds band indices (PLAsTiCC) or band names (``"g"``)."""
    name = f"objects[{index}]" + (f" ({object_id})" if object_id else "")
    n = len(mjd)
    if n == 0:
        raise RequestError(f"{name}: no observations")
    if n > max_points:
        raise RequestError(f"{name}: {n} observations; at most {max_points} per object")
    lengths = {"mjd": n, "passband": len(passband), "flux": len(flux), "flux_err": len(flux_err)}
    if detected is not None:
        lengths["detected"] = len(detected)
    if len(set(lengths.values())) != 1:
        raise RequestError(f"{name}: arrays of different lengths ({', '.join(f'{k} {v}' for k, v in lengths.items())})")
    index_of = {b: i for i, b in enumerate(bands)}
    band_idx = np.empty(n, dtype=np.int64)
    for i, b in enumerate(passband):
        if isinstance(b, str) and b in index_of:
            band_idx[i] = index_of[b]
        elif isinstance(b, int | np.integer) and not isinstance(b, bool) and 0 <= int(b) < len(bands):
            band_idx[i] = int(b)
        else:
            raise RequestError(f"{name}: passband[{i}] = {b!r} is not a band of the model (indices 0-{len(bands) - 1} "
                               f"or names {list(bands)})")
    values = {k: np.asarray(v, dtype=np.float64) for k, v in (("mjd", mjd), ("flux", flux), ("flux_err", flux_err))}
    for key, arr in values.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if len(bad):
            raise RequestError(f"{name}: {key}[{bad[0]}] is not a finite number")
    bad = np.flatnonzero(values["flux_err"] <= 0)
    if len(bad):
        raise RequestError(f"{name}: flux_err[{bad[0]}] = {values['flux_err'][bad[0]]:g}; errors must be > 0")
    if redshift is not None and not (np.isfinite(redshift) and redshift >= 0):
        raise RequestError(f"{name}: redshift = {redshift!r} must be a finite number >= 0")
    det = np.ones(n, dtype=bool) if detected is None else np.asarray(detected, dtype=bool)
    if not det.any():
        raise RequestError(f"{name}: no detection (detected is false everywhere)")
    order = np.argsort(values["mjd"], kind="stable")
    return Curve(object_id or f"object-{index}", values["mjd"][order], band_idx[order], values["flux"][order],
                 values["flux_err"][order], det[order], redshift)


def curves_from_table(frame: pd.DataFrame, bands: Sequence[str], max_points: int) -> list[Curve]:
    """The objects of an uploaded table in the PLAsTiCC columns (checked like a JSON request)."""
    missing = [c for c in ("object_id", "mjd", "passband", "flux", "flux_err") if c not in frame.columns]
    if missing:
        raise RequestError(f"the table has no column(s) {missing} (expected object_id, mjd, passband, flux, "
                           f"flux_err[, detected])")
    out = []
    for i, (object_id, rows) in enumerate(frame.groupby(frame["object_id"].astype(str), sort=False)):
        if i >= MAX_OBJECTS:
            raise RequestError(f"more than {MAX_OBJECTS} objects in one request")
        band = rows["passband"].tolist()
        band = [int(b) if isinstance(b, float | int | np.integer) and float(b).is_integer() else b for b in band]
        redshift = rows["redshift"].iloc[0] if "redshift" in rows.columns else None
        out.append(check_object(i, str(object_id), rows["mjd"].tolist(), band, rows["flux"].tolist(),
                                rows["flux_err"].tolist(), bands, max_points,
                                None if redshift is None or pd.isna(redshift) else float(redshift),
                                rows["detected"].astype(bool).tolist() if "detected" in rows.columns else None))
    if not out:
        raise RequestError("the table has no rows")
    return out


@dataclass
class Classified:
    probabilities: np.ndarray  # (N, K) calibrated
    ood_score: np.ndarray  # (N,)
    decision: np.ndarray  # (N,) the top class (the model's decision rule, config ``decision``)


def model_inputs(loaded: Any, curves: Sequence[Curve]) -> Any:
    """The batch a loaded model takes for ``curves``."""
    cfg, state = loaded.cfg, loaded.state
    if cfg.model == "t2":
        from .gp import gp_grids

        grids = gp_grids(list(curves), state.wavelengths, steps=cfg.gp_steps, window_days=cfg.window_days,
                         wavelength_scale=cfg.gp_wavelength_scale, progress=False)
        items = [{"grid": g, "globals": object_globals(c, cfg.use_redshift), "label": 0}
                 for g, c in zip(grids, curves, strict=True)]
        return collate_grids(items)
    features = curve_features(curves, len(state.bands)) if cfg.lc_features else [None] * len(curves)
    return collate_packed([{**tokens(c, cfg.use_redshift, f), "label": 0}
                           for c, f in zip(curves, features, strict=True)])


@torch.inference_mode()
def classify(loaded: Any, curves: Sequence[Curve]) -> Classified:
    """Calibrated class probabilities and OOD scores of ``curves`` (in chunks of CHUNK objects)."""
    model = loaded.model.eval()
    probs, scores, picked = [], [], []
    for start in range(0, len(curves), CHUNK):
        logits = model(model_inputs(loaded, curves[start:start + CHUNK])).float()  # (n, K), temperature-scaled
        probs.append(torch.softmax(logits, dim=-1).numpy())
        scores.append(ood_scores(logits).numpy())
        picked.append(decide(model, logits).numpy())
    if not probs:
        return Classified(np.zeros((0, len(loaded.state.classes))), np.zeros(0), np.zeros(0, dtype=np.int64))
    return Classified(np.concatenate(probs), np.concatenate(scores), np.concatenate(picked))


def answers(loaded: Any, curves: Sequence[Curve], result: Classified) -> list[dict[str, Any]]:
    """Per object: its id, the probability of every class, the top class (the model's decision rule) and the
    most probable one, the OOD score and whether it is above the validation threshold."""
    classes = list(loaded.state.classes)
    threshold = loaded.state.ood_threshold
    out = []
    for curve, p, s, top in zip(curves, result.probabilities, result.ood_score, result.decision, strict=True):
        probabilities = {c: float(v) for c, v in zip(classes, p, strict=True)}
        out.append({"object_id": curve.object_id, "probabilities": probabilities,
                    "top_class": classes[int(top)], "top_probability": float(p[int(top)]),
                    "most_probable_class": classes[int(np.argmax(p))], "ood_score": float(s),
                    "out_of_distribution": bool(threshold is not None and s > threshold), "n_points": len(curve)})
    return out


def run_items(loaded: Any, curves: list[Curve]) -> list[dict[str, Any]]:
    """The service's batch: the checked objects of many requests -> one answer row per object."""
    return answers(loaded, curves, classify(loaded, curves))


# --- the MLflow pyfunc model: a PLAsTiCC-layout table in, a table of probabilities out ----------------------

def pyfunc_example(loaded: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    from .data import synthetic_curves

    curves, _, _ = synthetic_curves(2, seed=1)
    rows = []
    for c in curves:
        for t, b, f, e in zip(c.mjd, c.passband, c.flux, c.flux_err, strict=True):
            rows.append({"object_id": c.object_id, "mjd": float(t), "passband": int(b) % len(loaded.state.bands),
                         "flux": float(f), "flux_err": float(e)})
    return pd.DataFrame(rows), {}


def pyfunc_predict(loaded: Any, model_input: Any, params: dict[str, Any]) -> pd.DataFrame:
    if not isinstance(model_input, pd.DataFrame):
        raise ValueError(f"the transients model takes a DataFrame of observations (object_id, mjd, passband, flux, "
                         f"flux_err), not {type(model_input).__name__}")
    try:
        curves = curves_from_table(model_input, loaded.state.bands, loaded.cfg.max_points)
    except RequestError as exc:
        raise ValueError(str(exc)) from None
    found = answers(loaded, curves, classify(loaded, curves))
    return pd.DataFrame([{"object_id": a["object_id"], "top_class": a["top_class"], "ood_score": a["ood_score"],
                          **{f"p_{c}": v for c, v in a["probabilities"].items()}} for a in found])

