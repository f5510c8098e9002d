"""Autoregressive rollouts in physical units, shared by the evaluation pipeline and the service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import WeatherState
from .forcings import forcings, utc_hours
from .grid import Grid
from .training import rollout


def lead_times(init_times: np.ndarray, steps: int, step_hours: int) -> np.ndarray:
    """(N, steps + 1) datetime64: each initial time followed by its ``steps`` forecast times."""
    hours = np.arange(steps + 1) * np.timedelta64(int(step_hours), "h")
    return np.asarray(init_times).astype("datetime64[ns]")[:, None] + hours[None].astype("timedelta64[ns]")


@torch.inference_mode()
def forecast(model: Any, state: WeatherState, history: np.ndarray, init_times: np.ndarray, steps: int,
             batch_size: int = 16) -> np.ndarray:
    """Roll ``model`` out ``steps`` steps from ``history`` (N, h, C, H, W), physical units, the last state valid
    at ``init_times`` (N,). Returns (N, steps, C, H, W) float32 in physical units."""
    grid = state.grid
    times = lead_times(init_times, steps, int(state.step_hours))  # (N, steps + 1)
    device = model.mean.device
    out = []
    for start in range(0, len(history), batch_size):
        hist = torch.from_numpy(np.ascontiguousarray(history[start:start + batch_size], np.float32)).to(device)
        block = times[start:start + batch_size]
        force = torch.from_numpy(forcings(block.reshape(-1), grid, model.forcings)).to(device)
        force = force.view(len(block), steps + 1, *force.shape[1:])  # (n, steps + 1, F, H, W)
        hours = torch.from_numpy(utc_hours(block[:, 0])).float().to(device)
        states = rollout(model, model.normalize(hist), force, steps, hours)  # steps x (n, C, H, W)
        out.append(model.denormalize(torch.stack(states, dim=1)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, steps, *history.shape[2:]), np.float32)


@dataclass(frozen=True)
class Rollout:
    """A checked request of the service, for its model process: ``history`` (h, C, H, W) in physical units, the
    last state valid at ``init_time``, rolled out ``steps`` steps."""

    history: np.ndarray
    init_time: np.datetime64
    steps: int


def run_items(loaded: Any, items: list[Rollout]) -> list[np.ndarray]:
    """The service's batch (in its model process): per request its (steps, C, H, W) rollout. The requests with
    the same number of steps and the same history shape roll out as one batch (a rollout of the demo's model on
    its 32 x 64 grid: ~25 ms alone, ~14 ms each in a batch of 8, one thread); each sample's states depend on its
    own history only."""
    out: dict[int, np.ndarray] = {}
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.steps, item.history.shape), []).append(i)
    for (steps, _), members in groups.items():
        predicted = forecast(loaded.model, loaded.state, np.stack([items[i].history for i in members]),
                             np.array([items[i].init_time for i in members]), steps, batch_size=len(members))
        for row, i in enumerate(members):
            out[i] = predicted[row]
    return [out[i] for i in range(len(items))]


# --- initial states from user data, and rollouts back to xarray (used by the service) ---------------------

class StateError(ValueError):
    """An initial state that does not fit the model (grid, variables, units, times, values): a 4xx."""


_TEMPERATURE_OFFSETS = {"k": 0.0, "kelvin": 0.0, "degc": 273.15, "°c": 273.15, "c": 273.15, "celsius": 273.15,
                        "degreec": 273.15, "degreesc": 273.15}


def _unit_key(unit: str) -> str:
    """Spelling-insensitive units: ``m**2 s**-2`` = ``m2 s-2``, ``deg_C`` = ``degC``."""
    return unit.strip().lower().replace("**", "").replace("^", "").replace(" ", "").replace("_", "")


def to_model_units(values: np.ndarray, given: str | None, expected: str, channel: str) -> np.ndarray:
    """``values`` in the model's units. Missing units are taken to be the model's; temperatures in degrees
    Celsius are converted to kelvin; any other mismatch is a :class:`StateError`."""
    if not given or not expected or _unit_key(given) == _unit_key(expected):
        return values
    g, e = _unit_key(given), _unit_key(expected)
    if g in _TEMPERATURE_OFFSETS and e in _TEMPERATURE_OFFSETS:
        return values + (_TEMPERATURE_OFFSETS[g] - _TEMPERATURE_OFFSETS[e])
    raise StateError(f"{channel}: units {given!r} do not match the model's {expected!r}")


def check_grid(lat: np.ndarray, lon: np.ndarray, state: WeatherState) -> None:
    """The (H, W) latitude/longitude of the input must be the model's grid (to 1e-3 degrees)."""
    grid = state.grid
    if lat.shape != grid.lat.shape:
        raise StateError(f"grid is {lat.shape[0]} x {lat.shape[1]} (lat x lon); the model's is "
                         f"{grid.lat.shape[0]} x {grid.lat.shape[1]} ({describe_grid(grid)})")
    if not (np.allclose(lat, grid.lat, atol=1e-3) and np.allclose(np.mod(lon, 360), np.mod(grid.lon, 360), atol=1e-3)):
        raise StateError(f"grid coordinates differ from the model's ({describe_grid(grid)})")


def describe_grid(grid: Grid) -> str:
    return (f"latitude {grid.lat[0, 0]:g} .. {grid.lat[-1, 0]:g}, longitude {grid.lon[0, 0]:g} .. {grid.lon[0, -1]:g}")


def state_from_dataset(ds: Any, state: WeatherState, history: int) -> tuple[np.ndarray, np.datetime64, list[str]]:
    """The last state of ``ds`` (xarray, ERA5 layout) and the ``history - 1`` before it at the model's step (an
    hourly file serves a 6-hourly model: it picks t - 18 h, t - 12 h, t - 6 h and t) as (h, C, H, W) in the
    model's units, the valid time of the last one, and notes (units assumed, times dropped)."""
    from .grid import spatial
    from .readers import MEMBER_DIMS, standardize

    ds = standardize(ds)
    try:
        ydim, xdim, lat, lon, _ = spatial(ds)
    except ValueError as exc:
        raise StateError(str(exc)) from None
    check_grid(lat, lon, state)
    if "time" not in ds.dims:
        if "time" in ds.coords and ds["time"].ndim == 0:
            ds = ds.expand_dims("time")
        else:
            raise StateError("the initial state needs a 'time' coordinate (the valid time of the state)")
    for dim in MEMBER_DIMS:
        if dim in ds.dims:
            raise StateError(f"the input has {ds.sizes[dim]} ensemble members ('{dim}'); send one member")
    if ds.sizes["time"] < history:
        raise StateError(f"the model needs {history} states {state.step_hours} h apart; the input has "
                         f"{ds.sizes['time']}")
    given = ds["time"].values.astype("datetime64[ns]")
    if history > 1:
        step = np.timedelta64(int(state.step_hours), "h").astype("timedelta64[ns]")
        wanted = given[-1] - step * np.arange(history - 1, -1, -1)
        missing = [str(np.datetime_as_string(t, unit="m")) for t in wanted if t not in given]
        if missing:
            raise StateError(f"the model needs {history} states {state.step_hours} h apart ending at the last one "
                             f"({np.datetime_as_string(given[-1], unit='m')}); missing {', '.join(missing)}")
        ds = ds.isel(time=[int(np.flatnonzero(given == t)[-1]) for t in wanted])
    else:
        ds = ds.isel(time=slice(ds.sizes["time"] - 1, None))
    times = ds["time"].values.astype("datetime64[ns]")
    notes, layers = [], []
    for channel, (var, level), unit in zip(state.channels, state.sources, state.units, strict=True):
        if var not in ds.data_vars:
            raise StateError(f"variable {var!r} is missing; the model needs {sorted({s[0] for s in state.sources})}")
        da = ds[var]
        if level is not None:
            if "level" not in da.dims:
                raise StateError(f"{var}: expected a 'level' dimension with level {level:g}")
            match = np.isclose(da["level"].values.astype(np.float64), float(level))
            if not match.any():
                raise StateError(f"{var}: level {level:g} is missing (levels given: {da['level'].values.tolist()})")
            da = da.isel(level=int(np.argmax(match)))
        extra = set(da.dims) - {"time", ydim, xdim}
        if extra:
            raise StateError(f"{var}: unexpected dimensions {sorted(extra)}")
        values = da.transpose("time", ydim, xdim).values.astype(np.float64)
        if not np.isfinite(values).all():
            raise StateError(f"{channel}: holds NaN or infinite values")
        given = da.attrs.get("units")
        if not given and unit:
            notes.append(f"{channel}: no units given, assumed {unit}")
        layers.append(to_model_units(values, given, unit, channel))
    return np.stack(layers, axis=1).astype(np.float32), times[-1], notes


def rollout_dataset(predicted: np.ndarray, init_time: np.datetime64, state: WeatherState,
                    attrs: dict[str, Any]) -> Any:
    """(steps, C, H, W) -> an xarray Dataset in the ERA5 layout of the training data (levels regrouped)."""
    import xarray as xr

    grid = state.grid
    steps = predicted.shape[0]
    times = lead_times(np.array([init_time]), steps, int(state.step_hours))[0, 1:]
    if grid.regular:
        coords: dict[str, Any] = {"latitude": ("latitude", grid.lat[:, 0], {"units": "degrees_north"}),
                                  "longitude": ("longitude", grid.lon[0], {"units": "degrees_east"})}
        space = ("latitude", "longitude")
    else:
        coords = {"lat": (("y", "x"), grid.lat, {"units": "degrees_north"}),
                  "lon": (("y", "x"), grid.lon, {"units": "degrees_east"})}
        space = ("y", "x")
    coords["time"] = ("time", times)
    data_vars: dict[str, Any] = {}
    by_var: dict[str, list[tuple[float | None, int]]] = {}
    for i, (var, level) in enumerate(state.sources):
        by_var.setdefault(var, []).append((level, i))
    first_levels: list[float] | None = None
    for var, items in by_var.items():
        unit = state.units[items[0][1]]
        if items[0][0] is None:
            data_vars[var] = (("time", *space), predicted[:, items[0][1]], {"units": unit})
            continue
        levels = [float(lv) for lv, _ in items if lv is not None]
        first_levels = first_levels or levels
        dim = "level" if levels == first_levels else f"level_{var}"  # variables read on other levels
        coords[dim] = (dim, np.array(levels), {"units": "hPa"})
        data_vars[var] = (("time", dim, *space), np.stack([predicted[:, i] for _, i in items], axis=1), {"units": unit})
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    ds.attrs["forecast_reference_time"] = str(np.datetime_as_string(np.asarray(init_time).astype("datetime64[s]")))
    return ds



# --- the MLflow pyfunc model: initial states as arrays in, the rollout out ---------------------------------

def pyfunc_example(loaded: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``history`` states at the training mean of every channel, valid at 2000-01-01 00 UTC (as seconds since
    the epoch), and 4 steps as the default ``steps`` param."""
    state: WeatherState = loaded.state
    h, w = state.grid.shape
    mean = state.mean.numpy().astype(np.float32)[None, :, None, None]
    history = np.broadcast_to(mean, (loaded.cfg.history, len(state.channels), h, w)).copy()
    return {"state": history, "valid_time": np.array([946_684_800], dtype=np.int64)}, {"steps": 4}


def pyfunc_predict(loaded: Any, model_input: Any, params: dict[str, Any]) -> np.ndarray:
    """The rollout (N, steps, C, H, W) in physical units from ``state`` (N, h, C, H, W) or (h, C, H, W), the
    last state valid at ``valid_time`` (N,) seconds since the epoch (UTC)."""
    if not isinstance(model_input, dict) or not {"state", "valid_time"} <= set(model_input):
        raise ValueError("the weather model takes {'state': (N, history, C, H, W) array, 'valid_time': (N,) "
                         "seconds since the epoch}")
    values = np.asarray(model_input["state"], dtype=np.float32)
    values = values[None] if values.ndim == 4 else values
    times = np.asarray(model_input["valid_time"]).reshape(-1).astype("datetime64[s]").astype("datetime64[ns]")
    state: WeatherState = loaded.state
    expected = (loaded.cfg.history, len(state.channels), *state.grid.shape)
    if values.ndim != 5 or values.shape[1:] != expected or len(times) != len(values):
        raise ValueError(f"state has shape {values.shape} with {len(times)} valid times; the model takes "
                         f"(N, {', '.join(map(str, expected))}) and N valid times")
    if not np.isfinite(values).all():
        raise ValueError("state holds NaN or infinite values")
    steps = int(params.get("steps", 4))
    if not 1 <= steps <= 400:
        raise ValueError(f"steps={steps}: expected 1 to 400")
    return forecast(loaded.model, state, values, times, steps)
