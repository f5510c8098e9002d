"""Training data of the weather domain: time splits, normalization with training statistics, the rollout
windows the trainer samples, and the state saved with a model (grid, channels, statistics, climatology,
calibration factors).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shared.saved import SavedState, tensor

from .config import FORCINGS
from .forcings import fit_climatology, forcings, resolve_forcings, utc_hours
from .grid import Grid
from .readers import Fields, load_fields, read_fields
from .synthetic import synthetic_dataset


@dataclass(frozen=True)
class WeatherState(SavedState):
    """What a WXFormer keeps from its training data: grid, channels and units, normalization statistics, static
    fields, the training period's daily cycle, and the calibration factors fitted on validation."""

    data: str  # the data's name (file name, or "synthetic")
    fingerprint: str
    channels: tuple[str, ...]  # one per (variable, level): t2m, t_850, ...
    sources: tuple[tuple[str, float | None], ...]  # (variable, level) of each channel
    units: tuple[str, ...]
    step_hours: int  # the model's time step
    data_step_hours: float  # the data's time step
    forcings: tuple[str, ...]  # the forcings the model reads, in order
    periods: dict[str, tuple[str, str]]  # train / val / test: first and last time (ISO, hours)
    regular_grid: bool
    static_names: tuple[str, ...]  # the static fields, in the order the model reads them
    latitude: Tensor  # (H,) for a regular grid, else (H, W); degrees, float64
    longitude: Tensor  # (W,) or (H, W)
    mean: Tensor  # (C,) float64, training period
    std: Tensor  # (C,) float64
    statics: dict[str, Tensor]  # name -> (H, W) float32, physical units
    climatology: Tensor | None = None  # (2 * harmonics + 1, C, H, W) normalized daily cycle (forcings.fit_climatology)
    damping: Tensor | None = None  # (steps, C) factors on the predicted change, fitted on validation
    relaxation: Tensor | None = None  # (steps, C) factors toward the climatology, fitted with the damping
    # how those factors were fitted: toward the climatology plus the state's area-mean anomaly (True) or toward
    # the climatology (False); None: before the choice existed (False, how those models were fitted)
    relaxation_keeps_mean: bool | None = None
    tendency_std: Tensor | None = None  # (C,) normalized; with normalize_tendency the unit of the change

    @property
    def grid(self) -> Grid:
        return Grid.from_axes(self.latitude, self.longitude, self.regular_grid)

    @classmethod
    def from_legacy(cls, info: Mapping[str, Any]) -> WeatherState:
        grid = info["grid"]
        regular = bool(grid.get("regular", True))
        optional = {k: tensor(info[k]) for k in ("climatology", "damping", "relaxation") if info.get(k)}
        arrays = {"latitude": tensor(grid["latitude"], torch.float64),
                  "longitude": tensor(grid["longitude"], torch.float64),
                  "mean": tensor(info["mean"], torch.float64), "std": tensor(info["std"], torch.float64),
                  **{f"statics.{k}": tensor(v) for k, v in info.get("statics", {}).items()}, **optional}
        meta = {"data": info["data"], "fingerprint": info["fingerprint"], "channels": info["channels"],
                "sources": info["sources"], "units": info["units"], "step_hours": info["step_hours"],
                "data_step_hours": info["data_step_hours"], "periods": info["periods"], "regular_grid": regular,
                # models saved before the forcings were a setting read all of them
                "forcings": info.get("forcings", list(FORCINGS)), "static_names": info.get("static_names", [])}
        return cls.from_parts(meta, arrays)


def split_bounds(n_times: int, val_fraction: float, test_fraction: float) -> list[tuple[int, int]]:
    """Contiguous train / validation / test index ranges, in time order."""
    n_test = int(round(n_times * test_fraction))
    n_val = int(round(n_times * val_fraction))
    n_train = n_times - n_val - n_test
    return [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n_times)]


def starts(bounds: tuple[int, int], offset: int, history: int, span: int, every: int) -> np.ndarray:
    """Initial indices t in [a, b) with t - (history - 1) * offset >= a and t + span * offset < b."""
    a, b = bounds
    first = a + (history - 1) * offset
    last = b - 1 - span * offset
    return np.arange(first, last + 1, every) if last >= first else np.zeros(0, dtype=np.int64)


class RolloutDataset(torch.utils.data.Dataset):
    """Training windows: ``history`` input states ending at t, the forcings at t, t + dt, ..., t + K dt, the
    K target states (all normalized) and the hour of the day of t (UTC), which places the climatology."""

    def __init__(self, states: np.ndarray, forcing: np.ndarray, indices: np.ndarray, offset: int, history: int,
                 rollout: int, hours: np.ndarray, bounds: tuple[int, int] | None = None, every: int = 1) -> None:
        self.states = torch.from_numpy(states)  # (T, C, H, W)
        self.forcing = torch.from_numpy(forcing)  # (T, F, H, W)
        self.hours = torch.from_numpy(hours).float()  # (T,) UTC hour of the day of each state
        self.indices = indices
        self.offset, self.history, self.rollout = offset, history, rollout
        self.bounds, self.every = bounds, every  # the period the windows lie in, and their spacing

    def longest(self, steps: int, min_windows: int) -> RolloutDataset | None:
        """Windows of the same period reaching as many steps as it allows, at most ``steps``, keeping at least
        ``min_windows`` of them; None when that is no more than this dataset's rollout (or bounds unknown)."""
        if self.bounds is None:
            return None
        for k in range(steps, self.rollout, -1):
            idx = starts(self.bounds, self.offset, self.history, k, self.every)
            if len(idx) >= min_windows:
                longer = copy.copy(self)  # the same arrays, other windows
                longer.indices, longer.rollout = idx, k
                return longer
        return None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t, o = int(self.indices[i]), self.offset
        hist = self.states[t - (self.history - 1) * o: t + 1: o]  # (h, C, H, W)
        force = self.forcing[t: t + self.rollout * o + 1: o]  # (K + 1, F, H, W)
        target = self.states[t + o: t + self.rollout * o + 1: o]  # (K, C, H, W)
        return hist, force, target, self.hours[t]


@dataclass
class Prepared:
    fields: Fields
    normalized: np.ndarray  # (T, C, H, W)
    forcing: np.ndarray  # (T, F, H, W)
    bounds: list[tuple[int, int]]
    offset: int  # time indices per model step
    datasets: list[RolloutDataset]
    state: WeatherState


def fields_for(cfg: Any, data: str | None = None) -> Fields:
    """The configured channels of ``data`` (default: the config's data, else the synthetic world)."""
    path = data or cfg.data
    kwargs = {"variables": tuple(cfg.variables), "levels": tuple(cfg.levels),
              "static_variables": tuple(cfg.static_variables), "member": cfg.member}
    if path:
        return load_fields(path, **kwargs)
    return read_fields(synthetic_dataset(cfg.synthetic_days, tuple(cfg.synthetic_grid), seed=cfg.seed),
                       name="synthetic", **kwargs)


def extra_statics(cfg: Any, fields: Fields) -> dict[str, np.ndarray]:
    """Static fields beyond the data's: those of ``static_file`` and, with ``land_fraction="auto"`` and no land-sea
    mask among the rest, the land fraction of each cell (see :mod:`.statics`)."""
    from .statics import has_land_field, land_fraction, statics_from_file

    extra = statics_from_file(cfg.static_file, fields.grid) if cfg.static_file else {}
    clash = sorted(set(extra) & set(fields.statics))
    if clash:
        raise ValueError(f"static_file {cfg.static_file}: fields {clash} are also static fields of the data")
    if cfg.land_fraction == "auto" and not has_land_field([*fields.statics, *extra]):
        extra["land_fraction"] = land_fraction(fields.grid)
    return extra


def time_offset(fields: Fields, step_hours: int) -> int:
    """Time indices per model step; the data's time step must divide the model's."""
    native = fields.step_hours
    ratio = step_hours / native if native == native else float("nan")
    if not (ratio >= 1 and abs(ratio - round(ratio)) < 1e-6):
        raise ValueError(f"step_hours={step_hours} is not a multiple of the data's time step ({native:g} h)")
    return int(round(ratio))


def prepare(cfg: Any, data: str | None = None) -> Prepared:
    """Read, split in time (train / val / test), normalize with training statistics, and window."""
    fields = fields_for(cfg, data)
    fields.statics.update(extra_statics(cfg, fields))
    offset = time_offset(fields, cfg.step_hours)
    every = max(1, int(round(cfg.sample_every_hours / fields.step_hours)))
    bounds = split_bounds(len(fields.times), cfg.val_fraction, cfg.test_fraction)
    train = fields.values[bounds[0][0]: bounds[0][1]]
    mean = train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = train.std(axis=(0, 2, 3), dtype=np.float64) + 1e-6
    normalized = ((fields.values - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    forcing_names = resolve_forcings(cfg.forcings, fields.times)
    forcing = forcings(fields.times, fields.grid, forcing_names)
    hours = utc_hours(fields.times)
    datasets = []
    for a, b in bounds:
        idx = starts((a, b), offset, cfg.history, cfg.train_rollout, every)
        if len(idx) == 0:
            raise ValueError(f"{fields.name}: a split of {b - a} time steps is too short for history {cfg.history} "
                             f"and {cfg.train_rollout} steps of {cfg.step_hours} h; use longer data or smaller "
                             f"settings")
        datasets.append(RolloutDataset(normalized, forcing, idx, offset, cfg.history, cfg.train_rollout, hours,
                                       (a, b), every))
    a, b = bounds[0]
    climatology = fit_climatology(normalized[a:b], fields.times[a:b], cfg.climatology_harmonics)
    tendency = None
    if cfg.normalize_tendency:
        lag = offset * cfg.base_lag  # data steps to the base state
        change = normalized[a + lag: b] - normalized[a: b - lag]  # (T - lag, C, H, W)
        tendency = torch.from_numpy(np.round(change.std(axis=(0, 2, 3), dtype=np.float64) + 1e-6, 6).astype(np.float32))

    def iso(i: int) -> str:
        return str(np.datetime_as_string(fields.times[i], unit="h"))

    latitude, longitude = fields.grid.axes()
    state = WeatherState(
        data=fields.name, fingerprint=fields.fingerprint, channels=tuple(fields.channels),
        sources=tuple((str(v), None if lv is None else float(lv)) for v, lv in fields.sources),
        units=tuple(fields.units), step_hours=cfg.step_hours, data_step_hours=fields.step_hours,
        forcings=forcing_names, static_names=tuple(fields.statics),
        periods={name: (iso(a), iso(b - 1)) for name, (a, b) in zip(("train", "val", "test"), bounds, strict=True)},
        regular_grid=fields.grid.regular, latitude=latitude, longitude=longitude,
        mean=torch.from_numpy(mean), std=torch.from_numpy(std),
        # rounded to 1e-4 as the models behind the README's figures saved them (then as JSON)
        statics={k: torch.from_numpy(np.round(v, 4)) for k, v in fields.statics.items()},
        # the training period's mean daily cycle (normalized), which calibration relaxes the forecast to
        climatology=torch.from_numpy(np.round(climatology, 4)), tendency_std=tendency)
    return Prepared(fields, normalized, forcing, bounds, offset, datasets, state)
