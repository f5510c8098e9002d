"""BentoML service of the weather domain on port 3002.

- ``POST /forecast``: multipart upload of an initial state as netCDF (a GRIB file works too) plus ``steps``;
  returns the rollout as netCDF in the layout of the training data, or JSON summary statistics with
  ``format=json``.
- ``POST /forecast_json``: the initial state as JSON (small grids), returns values and summary statistics.
- ``GET /model``: the served model's grid, channels, units and time step.

The rollouts of requests that arrive together run as one batch in the service's model process
(:class:`shared.serving.BatchingService`, ``inference.run_items``); reading an upload and writing the netCDF
answer run on worker threads, off the event loop.

Inputs are checked against the model's grid, variables, levels, units and values (a 422 saying what is
wrong); uploads above ``TESSERA_WEATHER_MAX_BODY_BYTES`` (32 MiB) get a 413.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.weather.client import example_request
from services.weather.data import WeatherState
from services.weather.inference import Rollout, StateError, lead_times, rollout_dataset, to_model_units
from shared.loaded import LoadedModel
from shared.serving import BENTO_MAX_CONCURRENCY, JSON, BatchingService, ModelRef, RequestError, answers_errors, guard

MAX_STEPS = 120  # 30 days of 6-hourly steps
MAX_JSON_POINTS = 20_000  # grid points per field in the JSON form; larger grids go through netCDF


class ForecastJSON(BaseModel):
    """An initial state on the model's grid (see ``/model``), one (lat x lon) array per channel."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"example": example_request()})
    time: datetime = Field(description="valid time of the state (ISO 8601; UTC when no zone is given)")
    fields: dict[str, list[list[float]]] = Field(
        min_length=1, description="channel (e.g. t2m, t_850) -> rows of values, latitude by longitude, grid order")
    units: dict[str, str] | None = Field(default=None, description="units per channel (default: the model's)")
    steps: int = Field(default=4, ge=1, le=MAX_STEPS, description="model steps to roll out")
    include_values: bool = Field(default=True, description="return the forecast fields, not only summaries")


class ForecastSummary(BaseModel):
    times: list[str]
    lead_hours: list[int]
    channels: list[str]
    units: dict[str, str]
    summary: dict[str, dict[str, list[float]]]  # channel -> {"mean" (latitude-weighted), "min", "max"} per step
    values: dict[str, list[list[list[float]]]] | None = None  # channel -> steps x lat x lon
    notes: list[str] = []
    latency_ms: float
    model: ModelRef


def _utc(value: datetime) -> np.datetime64:
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return np.datetime64(value, "ns")


@bentoml.service(name="weather", workers=1, resources={"cpu": "2"},
                 traffic={"timeout": 300, "max_concurrency": BENTO_MAX_CONCURRENCY})
class Weather(BatchingService):
    """Weather forecasts from WXFormer, rolled out step by step from an initial state: upload the state as
    netCDF (or GRIB) to `/forecast` and get the rollout back as netCDF in the data's own layout, or send a small
    grid as JSON to `/forecast_json`. `/model` describes the grid, channels, units and time step. (Requests that
    arrive together roll out as one batch.)"""

    domain = "weather"
    batch_function = "services.weather.inference:run_items"
    max_batch_items = 16

    @bentoml.api(route="/forecast")
    @answers_errors
    async def forecast(self, file: Path, steps: int = Field(default=4, ge=1, le=MAX_STEPS),
                       format: Literal["netcdf", "json"] = "netcdf") -> Any:
        """Roll out from an uploaded netCDF (or GRIB) initial state; the last ``history`` times are used."""
        loaded = self.holder.get()
        states, init_time, notes = await asyncio.to_thread(_read_state, Path(file), loaded)
        predicted, latency = await self._rollout(loaded, states, init_time, steps)
        if format == "json":
            return _summary(loaded, predicted, init_time, notes, latency, values=False)
        content = await asyncio.to_thread(_netcdf, loaded, predicted, init_time, notes)
        from starlette.responses import Response

        return Response(content, media_type="application/x-netcdf",
                        headers={"Content-Disposition": 'attachment; filename="forecast.nc"',
                                 "X-Model-Version": str(loaded.version)})

    @bentoml.api(route="/forecast_json")
    @answers_errors
    async def forecast_json(self, request: ForecastJSON, /) -> ForecastSummary:
        """Roll out from an initial state given as JSON (grids up to 20,000 points)."""
        loaded = self.holder.get()
        states, notes = _state_from_json(request, loaded.state, loaded.cfg.history)
        init_time = _utc(request.time)
        predicted, latency = await self._rollout(loaded, states, init_time, request.steps)
        return _summary(loaded, predicted, init_time, notes, latency, values=request.include_values)

    async def _rollout(self, loaded: LoadedModel, states: np.ndarray, init_time: np.datetime64,
                       steps: int) -> tuple[np.ndarray, float]:
        """(steps, C, H, W) from the (h, C, H, W) history, on the model the request was checked on, and the ms
        it took (its wait for the batch included)."""
        started = time.perf_counter()
        (predicted,) = await self.batcher.submit(loaded, [Rollout(states, init_time, steps)])
        return predicted, (time.perf_counter() - started) * 1000


def _read_state(path: Path, loaded: LoadedModel) -> tuple[np.ndarray, np.datetime64, list[str]]:
    ds = _open_upload(path)
    try:
        return _state(ds, loaded.state, loaded.cfg.history)
    finally:
        ds.close()


def _netcdf(loaded: LoadedModel, predicted: np.ndarray, init_time: np.datetime64, notes: list[str]) -> bytes:
    attrs = {"title": "Tessera weather forecast", "model": f"{loaded.name} v{loaded.version}",
             "model_run_id": str(loaded.run_id), "architecture": str(loaded.cfg.model), "notes": "; ".join(notes)}
    return bytes(rollout_dataset(predicted, init_time, loaded.state, attrs).to_netcdf())  # netCDF-4, in memory


def _summary(loaded: LoadedModel, predicted: np.ndarray, init_time: np.datetime64, notes: list[str], latency: float,
             values: bool) -> ForecastSummary:
    state: WeatherState = loaded.state
    steps = predicted.shape[0]
    weights = state.grid.weights()
    times = lead_times(np.array([init_time]), steps, int(state.step_hours))[0, 1:]
    summary = {c: {"mean": [round(float((predicted[k, i] * weights).mean()), 4) for k in range(steps)],
                   "min": [round(float(predicted[k, i].min()), 4) for k in range(steps)],
                   "max": [round(float(predicted[k, i].max()), 4) for k in range(steps)]}
               for i, c in enumerate(state.channels)}
    return ForecastSummary(
        times=[str(np.datetime_as_string(t, unit="m")) for t in times],
        lead_hours=[int(state.step_hours) * (k + 1) for k in range(steps)],
        channels=list(state.channels), units=dict(zip(state.channels, state.units, strict=True)),
        summary=summary, notes=notes, latency_ms=latency, model=ModelRef(**loaded.describe()),
        values={c: np.round(predicted[:, i], 4).tolist() for i, c in enumerate(state.channels)} if values else None)


def _open_upload(path: Path) -> Any:
    import xarray as xr

    if not path.exists() or path.stat().st_size == 0:
        raise RequestError("the uploaded file is empty")
    with path.open("rb") as handle:
        magic = handle.read(4)
    try:
        if magic == b"GRIB":
            return xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""}).load()
        return xr.open_dataset(path).load()
    except Exception as exc:
        raise RequestError(f"could not read the upload as netCDF or GRIB: {type(exc).__name__}: {exc}") from None


def _state(ds: Any, state: WeatherState, history: int) -> tuple[np.ndarray, np.datetime64, list[str]]:
    from services.weather.inference import state_from_dataset

    try:
        return state_from_dataset(ds, state, history)
    except StateError as exc:
        raise RequestError(str(exc)) from None


def _state_from_json(request: ForecastJSON, state: WeatherState, history: int) -> tuple[np.ndarray, list[str]]:
    if history != 1:
        raise RequestError(f"the served model needs {history} states {state.step_hours} h apart and this endpoint "
                           f"takes one; use POST /forecast with a netCDF file holding them (hourly states serve)")
    channels = list(state.channels)
    unknown = sorted(set(request.fields) - set(channels))
    missing = [c for c in channels if c not in request.fields]
    if unknown or missing:
        raise RequestError(f"fields must be exactly the model's channels {channels}"
                           + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    h, w = state.grid.shape
    if h * w > MAX_JSON_POINTS:
        raise RequestError(f"the model's grid has {h * w} points; the JSON form takes up to {MAX_JSON_POINTS}; "
                           f"upload netCDF to POST /forecast")
    notes, layers = [], []
    units = request.units or {}
    for channel, unit in zip(channels, state.units, strict=True):
        rows = request.fields[channel]
        if len(rows) != h or any(len(r) != w for r in rows):
            bad = next((i for i, r in enumerate(rows) if len(r) != w), None)
            detail = (f"row {bad} has {len(rows[bad])} values" if bad is not None and len(rows) == h
                      else f"{len(rows)} rows")
            raise RequestError(f"{channel}: expected {h} rows (latitudes) of {w} values (longitudes), got {detail}")
        values = np.asarray(rows, dtype=np.float64)
        if channel not in units and unit:
            notes.append(f"{channel}: no units given, assumed {unit}")
        try:
            layers.append(to_model_units(values, units.get(channel), unit, channel))
        except StateError as exc:
            raise RequestError(str(exc)) from None
    states = np.stack(layers)[None].astype(np.float32)  # (1, C, H, W): a history of one state
    if not np.isfinite(states).all():
        raise RequestError("the state holds values too large for float32")
    return states, notes


guard(Weather, "weather", answers={"/forecast": (
    "the forecast: with format=netcdf (the default) a netCDF-4 file (forecast.nc: every channel at each lead, in "
    "physical units, on the model's grid; the version in X-Model-Version), with format=json the summary that "
    "/forecast_json answers", {"application/x-netcdf": {"type": "string", "format": "binary"},
                               JSON: "/forecast_json"})})
