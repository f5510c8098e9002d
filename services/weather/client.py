"""Client side of the weather service: a netCDF (or GRIB) initial state in, the rollout as netCDF out
(``tessera predict weather``, the demo)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.table import Table

from shared.client import check
from shared.registry import Prediction

from .readers import open_dataset
from .synthetic import synthetic_dataset

EXAMPLE_HOUR = 5  # the state at 05:00 UTC on the first synthetic day


@functools.cache
def _example_state() -> Any:
    """One state of the built-in synthetic world on its default grid (what the demo's model is trained on)."""
    ds = synthetic_dataset(days=1, seed=0).isel(time=slice(EXAMPLE_HOUR, EXAMPLE_HOUR + 1))
    return ds.drop_vars(["lsm", "orography"])


def example_request() -> dict[str, Any]:
    """The ``POST /forecast_json`` body of :func:`_example_state` (values rounded to 0.01 K)."""
    ds = _example_state()
    fields = {"t_850": ds["t"].values[0, 0], "t_500": ds["t"].values[0, 1], "t2m": ds["t2m"].values[0]}
    when = str(np.datetime_as_string(ds.time.values[0], unit="s")) + "Z"
    return {"time": when, "steps": 2, "include_values": False, "units": {k: "K" for k in fields},
            "fields": {k: np.round(v.astype(np.float64), 2).tolist() for k, v in fields.items()}}


def example_netcdf(folder: Path, data: str | None = None) -> Path:
    """The last day of states of ``data`` (netCDF / zarr / GRIB), or of the synthetic world, as a netCDF
    upload: enough for a model with 4 states 6 h apart (the default); the service picks the ones it needs."""
    if data:
        with open_dataset(data) as source:
            statics = [v for v in source.data_vars if "time" not in source[v].dims]
            times = source["time"].values
            day = times >= times[-1] - np.timedelta64(24, "h")
            state = source.isel(time=np.flatnonzero(day)).drop_vars(statics).load()
    else:  # the day before 05:00 UTC on the second synthetic day, hourly: enough for any history to 4 x 6 h
        state = synthetic_dataset(days=2, seed=0).isel(time=slice(EXAMPLE_HOUR, EXAMPLE_HOUR + 25))
        state = state.drop_vars(["lsm", "orography"])
    path = folder / "weather-state.nc"
    state.to_netcdf(path)
    return path


def _area_mean(field: np.ndarray, latitude: np.ndarray) -> float:
    weights = np.cos(np.deg2rad(latitude))[:, None] * np.ones((1, field.shape[-1]))
    return float((field * weights).sum() / weights.sum())


def predict_netcdf(url: str, path: Path, *, steps: int = 4, output: Path, timeout: float = 600.0) -> Prediction:
    """Upload an initial state (netCDF or GRIB), save the rollout as netCDF in ``output``, and summarise it as
    latitude-weighted means per valid time."""
    import xarray as xr

    with path.open("rb") as handle:
        response = check(httpx.post(url, files={"file": (path.name, handle, "application/octet-stream")},
                                    data={"steps": str(steps)}, timeout=timeout))
    output.write_bytes(response.content)
    version = response.headers.get("x-model-version", "?")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "forecast.nc"
        copy.write_bytes(response.content)
        rollout = xr.open_dataset(copy).load()
    table = Table(title=f"POST {url} (netCDF in, netCDF out) -> {rollout.attrs.get('architecture')} v{version}: "
                        f"latitude-weighted means; {output} ({len(response.content) / 1e6:.1f} MB)")
    table.add_column("valid time")
    columns = []
    for var in rollout.data_vars:
        da = rollout[var]
        level_dim = next((d for d in da.dims if str(d).startswith("level")), None)
        for level in (da[level_dim].values if level_dim else [None]):
            field = da.sel({level_dim: level}) if level_dim else da
            columns.append(field)
            table.add_column(f"{var}{'' if level is None else f' {level:g} hPa'} ({da.attrs.get('units', '')})",
                             justify="right")
    latitude = rollout["latitude"].values if "latitude" in rollout.coords else rollout["lat"].values[:, 0]
    for k, when in enumerate(rollout.time.values):
        table.add_row(str(when)[:13], *(f"{_area_mean(f.isel(time=k).values, latitude):.2f}" for f in columns))
    return Prediction(version=str(version), summary=table, output=output)
