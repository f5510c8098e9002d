"""Evaluation pipeline of the weather domain: rollouts over a held-out period, scored against persistence and
climatology computed in the same run (WeatherBench-2 RMSE and ACC per channel and lead time).

The model is scored twice: calibrated (as it serves: the damping and relaxation factors fitted on validation
applied) and raw (the network's own change, no factors), so that skill the calibration brings is not taken for
the network's. Every score and every difference between a model and a baseline gets a 95 % interval from a
circular block bootstrap over initial times; activity (the spatial spread of the anomaly) and bias sit beside
them, so that smoothing toward the climatology cannot pass for skill."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from shared.registry import EvaluationResult

from .config import WeatherEvalConfig
from .data import WeatherState, fields_for, split_bounds, starts, time_offset
from .forcings import daily_harmonics, fit_climatology, utc_hours
from .inference import StateError, check_grid, forecast, lead_times
from .metrics import (
    acc_per_init,
    activity,
    bias,
    block_bootstrap,
    climatology_at,
    hourly_climatology,
    interval,
    weighted_mse,
)
from .readers import Fields

MODELS_SCORED = ("model", "model_raw")  # the calibrated forecast (as served) and the network alone


def _check_compatible(state: WeatherState, fields: Fields) -> None:
    if fields.channels != list(state.channels):
        raise ValueError(f"the evaluation data has channels {fields.channels}; the model forecasts "
                         f"{list(state.channels)}")
    try:
        check_grid(fields.grid.lat, fields.grid.lon, state)
    except StateError as exc:
        raise ValueError(f"the evaluation data does not fit the model: {exc}") from None


def diurnal_persistence(values: np.ndarray, inits: np.ndarray, lead_hours: list[int],
                        data_step_hours: float) -> np.ndarray | None:
    """(N, L, ...) the state at the same hour of the day on the last day before each initial time, per lead:
    yesterday's diurnal cycle replayed (at a whole-day lead it is persistence). None when the data's time step
    does not divide the day or the record does not reach back far enough."""
    back_hours = [24 * math.ceil(h / 24) - h for h in lead_hours]  # 0 <= back < 24
    steps = [b / data_step_hours for b in back_hours]
    if not all(s == int(s) for s in steps) or len(inits) == 0 or int(min(inits)) < max(steps):
        return None
    return np.stack([values[inits - int(s)] for s in steps], axis=1)


def relaxed_diurnal_persistence(values: np.ndarray, times: np.ndarray, train: tuple[int, int],
                                fit_inits: np.ndarray, inits: np.ndarray, lead_hours: list[int],
                                data_step_hours: float, weights: np.ndarray, harmonics: int = 2,
                                keep_mean: bool = False) -> np.ndarray | None:
    """(N, L, C, H, W) diurnal persistence moved a fraction r of the way to the training period's daily-cycle
    climatology at the valid time (``harmonics`` harmonics, as the model's calibration), r in [0, 1] per lead and
    channel fitted by least squares over ``fit_inits`` (validation initial times). It is the model's
    calibration with no network: what the network's learned change has to improve on; with ``keep_mean`` (the
    model's ``relaxation_mean`` keep) the climatology plus the base state's own latitude-weighted area-mean
    anomaly, as :meth:`WXFormer.pull` (the base is a day before the valid time: the climatology's hour is the
    same). None where diurnal persistence is (see :func:`diurnal_persistence`)."""
    base = diurnal_persistence(values, inits, lead_hours, data_step_hours)
    fit_base = diurnal_persistence(values, fit_inits, lead_hours, data_step_hours)
    if base is None or fit_base is None:
        return None
    coef = fit_climatology(values[train[0]: train[1]], times[train[0]: train[1]], harmonics)
    steps = np.asarray(lead_hours) / data_step_hours
    if not np.allclose(steps, np.round(steps)):
        return None

    def climate(starts: np.ndarray) -> np.ndarray:  # (N, L, C, H, W) at the valid times
        valid = times[starts[:, None] + np.round(steps).astype(int)[None]]
        return np.einsum("nlj,jchw->nlchw", daily_harmonics(utc_hours(valid), harmonics), coef)

    def pull(clim: np.ndarray, base: np.ndarray) -> np.ndarray:
        towards = clim - base
        if keep_mean:
            towards = towards - (towards * weights).sum(axis=(-2, -1), keepdims=True) / weights.sum()
        return towards

    clim, fit_clim = climate(inits), climate(fit_inits)
    truth = np.stack([values[fit_inits + int(s)] for s in np.round(steps)], axis=1)
    towards = pull(fit_clim, fit_base)
    num = ((truth - fit_base) * towards * weights).sum(axis=(0, 3, 4))  # (L, C)
    den = (towards * towards * weights).sum(axis=(0, 3, 4))
    r = np.clip(np.where(den > 0, num / np.maximum(den, 1e-30), 0.0), 0.0, 1.0)
    return base + r[None, :, :, None, None] * pull(clim, base)


def raw_forecast(model: Any, state: WeatherState, history: np.ndarray, init_times: np.ndarray,
                 steps: int) -> np.ndarray:
    """:func:`forecast` with the calibration taken off: the network's change as predicted, from its base state."""
    import torch

    saved = model.damping, model.relaxation
    empty = torch.zeros(0, model.n_channels)
    try:
        model.set_damping(empty)
        model.set_relaxation(empty)
        return forecast(model, state, history, init_times, steps)
    finally:
        model.damping, model.relaxation = saved


def bootstrap_scores(mse: dict[str, np.ndarray], accs: dict[str, np.ndarray], block: int, samples: int,
                     seed: int = 0) -> dict[str, Any]:
    """95 % intervals (2, L, C) of RMSE and ACC per forecast, and of each model's difference to each baseline
    (keyed "model - baseline"), from per-initial-time MSE and ACC (N, L, C) resampled in blocks (the same
    resamples for every forecast, so that the differences are paired)."""
    n = next(iter(mse.values())).shape[0]
    idx = block_bootstrap(n, block, samples, seed)  # (S, N)
    rmse_boot = {k: np.sqrt(v[idx].mean(axis=1)) for k, v in mse.items()}  # (S, L, C)
    acc_boot = {k: v[idx].mean(axis=1) for k, v in accs.items()}
    out: dict[str, Any] = {"rmse": {k: interval(v) for k, v in rmse_boot.items()},
                           "acc": {k: interval(v) for k, v in acc_boot.items()},
                           "rmse_difference": {}, "acc_difference": {}}
    for m in (k for k in MODELS_SCORED if k in mse):
        for b in (k for k in mse if k not in MODELS_SCORED):
            out["rmse_difference"][f"{m} - {b}"] = interval(rmse_boot[m] - rmse_boot[b])
            out["acc_difference"][f"{m} - {b}"] = interval(acc_boot[m] - acc_boot[b])
    return out


def evaluate_forecasts(model: Any, cfg: Any, state: WeatherState, data: str | None,
                       settings: WeatherEvalConfig) -> EvaluationResult:
    """Rollouts of ``settings.lead_steps`` steps from initial times every ``init_every_hours`` over the test (or
    validation) period, scored with the baselines. A ValueError says why data does not fit the model."""
    from .plots import maps_figure, scores_figure

    lead_steps, split = settings.lead_steps, settings.split
    fields = fields_for(cfg, data)
    _check_compatible(state, fields)
    periods = split_bounds(len(fields.times), cfg.val_fraction, cfg.test_fraction)
    bounds = periods[1 if split == "val" else 2]
    o = time_offset(fields, cfg.step_hours)
    every = max(1, int(round(settings.init_every_hours / fields.step_hours)))
    inits = starts(bounds, o, cfg.history, lead_steps, every)
    if len(inits) == 0:
        raise ValueError(f"the {split} period ({bounds[1] - bounds[0]} time steps) is shorter than {lead_steps} "
                         f"steps of {cfg.step_hours} h; lower lead_steps")
    values, times = fields.values, fields.times
    history = np.stack([values[t - (cfg.history - 1) * o: t + 1: o] for t in inits])  # (N, h, C, H, W)
    truth = np.stack([values[t + o: t + lead_steps * o + 1: o] for t in inits])  # (N, L, C, H, W)
    started = time.perf_counter()
    predicted = forecast(model, state, history, times[inits], lead_steps)
    seconds = time.perf_counter() - started
    raw = raw_forecast(model, state, history, times[inits], lead_steps)
    persistence = np.repeat(values[inits][:, None], lead_steps, axis=1)
    a, b = periods[0]
    clim = hourly_climatology(values[a:b], times[a:b])
    valid_times = lead_times(times[inits], lead_steps, cfg.step_hours)[:, 1:]  # (N, L)
    climatology = climatology_at(clim, valid_times)
    weights = fields.grid.weights()

    lead_hours = [int(cfg.step_hours * (k + 1)) for k in range(lead_steps)]
    forecasts = {"model": predicted, "model_raw": raw, "persistence": persistence, "climatology": climatology}
    diurnal = diurnal_persistence(values, inits, lead_hours, fields.step_hours)
    if diurnal is not None:
        forecasts["diurnal_persistence"] = diurnal
        day = int(round(24 / fields.step_hours))  # a day of validation record before each start
        val_inits = starts(periods[1], 1, day + 1, lead_steps * o, 1)
        relaxed = relaxed_diurnal_persistence(values, times, periods[0], val_inits, inits, lead_hours,
                                              fields.step_hours, weights, cfg.climatology_harmonics,
                                              bool(getattr(model, "keep_mean", False)))
        if relaxed is not None:
            forecasts["relaxed_diurnal_persistence"] = relaxed
    mse = {k: weighted_mse(v, truth, weights) for k, v in forecasts.items()}  # (N, L, C)
    accs = {k: acc_per_init(v, truth, climatology, weights) for k, v in forecasts.items()}
    rmse = {k: np.sqrt(v.mean(axis=0)) for k, v in mse.items()}  # (L, C)
    scores = {k: v.mean(axis=0) for k, v in accs.items()}
    init_hours = every * fields.step_hours
    block = max(1, int(round(settings.bootstrap_block_hours / init_hours)))
    boot = bootstrap_scores(mse, accs, block, settings.bootstrap_samples, settings.seed)

    def per_channel(table: np.ndarray) -> dict[str, list[float]]:
        return {c: [round(float(x), 5) for x in table[:, i]] for i, c in enumerate(fields.channels)}

    def intervals(bounds: np.ndarray) -> dict[str, list[list[float]]]:  # (2, L, C) -> channel: [[lo, hi], ...]
        return {c: [[round(float(bounds[0, j, i]), 5), round(float(bounds[1, j, i]), 5)]
                    for j in range(bounds.shape[1])] for i, c in enumerate(fields.channels)}

    def differences(points: dict[str, np.ndarray], table: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {}
        for name, ci in table.items():  # "model - baseline" -> (2, L, C)
            model_name, baseline = name.split(" - ")
            point = points[model_name] - points[baseline]
            out[name] = {c: [[round(float(point[j, i]), 5), round(float(ci[0, j, i]), 5),
                              round(float(ci[1, j, i]), 5)] for j in range(point.shape[0])]
                         for i, c in enumerate(fields.channels)}
        return out

    metrics: dict[str, Any] = {
        "lead_hours": lead_hours,
        "rmse": {k: per_channel(v) for k, v in rmse.items()},
        "acc": {k: per_channel(v) for k, v in scores.items()},
        "units": dict(zip(fields.channels, fields.units, strict=True)),
        "skill_vs_persistence": per_channel(1.0 - rmse["model"] / np.maximum(rmse["persistence"], 1e-12)),
        "rmse_ci95": {k: intervals(v) for k, v in boot["rmse"].items()},
        "acc_ci95": {k: intervals(v) for k, v in boot["acc"].items()},
        # [difference, lower, upper] per lead: below zero with the upper bound too = lower RMSE, shown
        "rmse_difference_ci95": differences(rmse, boot["rmse_difference"]),
        "acc_difference_ci95": differences(scores, boot["acc_difference"]),
        "activity": {**{k: per_channel(activity(v, climatology, weights)) for k, v in forecasts.items()},
                     "truth": per_channel(activity(truth, climatology, weights))},
        "bias": {k: per_channel(bias(v, truth, weights)) for k, v in forecasts.items()},
        "bootstrap": {"samples": settings.bootstrap_samples, "block_initial_times": block,
                      "block_hours": block * init_hours},
        "split": split, "period": [str(np.datetime_as_string(times[bounds[0]], unit="h")),
                                   str(np.datetime_as_string(times[bounds[1] - 1], unit="h"))],
        "initial_times": len(inits), "data": fields.name,
        "rollout_seconds_per_step": seconds / (len(inits) * lead_steps),
    }
    lead = min(settings.map_lead, lead_steps) - 1
    figures = {
        "rmse_vs_lead.png": scores_figure(lead_hours, rmse, fields.channels, fields.units, "RMSE",
                                          {k: boot["rmse"][k] for k in MODELS_SCORED}),
        "acc_vs_lead.png": scores_figure(lead_hours, scores, fields.channels, None, "ACC",
                                         {k: boot["acc"][k] for k in MODELS_SCORED}),
        "maps.png": maps_figure(truth[0, lead], predicted[0, lead], fields.grid, fields.channels, fields.units,
                                f"{np.datetime_as_string(valid_times[0, lead], unit='h')} (+{lead_hours[lead]} h)"),
    }
    return EvaluationResult(metrics=metrics, figures=figures)
