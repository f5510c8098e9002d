"""``make demo``: start the local stack, train every available domain model on Ray, query the services.

Trains on the synthetic default data, or on ``TESSERA_DATA`` when given (a CSV/Parquet path for forecasting, a
netCDF/GRIB file for weather, a Push-T replay buffer ``.zarr`` for robot_policy), with short settings so the
whole demo fits in a few minutes on 2 CPU cores; leaves the stack running.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from infra import stack
from pipelines.cli import job_entrypoint, submit_and_follow

console = Console(width=max(110, Console().width))  # tables stay readable under make / CI logs

# Short runs: real training on real or synthetic data, sized for a 2-core laptop.
DEMO_JOBS: list[tuple[str, str, list[str]]] = [
    ("forecasting", "itransformer", ["epochs=3", "max_steps_per_epoch=120"]),
    ("forecasting", "autoformer", ["epochs=2", "max_steps_per_epoch=60", "d_model=128", "d_ff=256"]),
    ("weather", "wxformer", ["epochs=2", "max_steps_per_epoch=30", "synthetic_days=20"]),
    ("robot_policy", "ebt", ["epochs=3", "max_steps_per_epoch=40", "synthetic_episodes=30", "d_model=64",
                             "d_ff=128", "n_layers=2", "batch_size=128"]),
]
DATA_SUFFIXES = {"forecasting": (".csv", ".parquet"), "weather": (".grib", ".grb", ".grib2", ".nc"),
                 "robot_policy": (".zarr",)}


def data_for(domain: str, data: str | None) -> str | None:
    """``TESSERA_DATA`` for the domains that read that kind of file; the others train on their synthetic data."""
    if data and data.rstrip("/").lower().endswith(DATA_SUFFIXES.get(domain, ())):
        return data
    return None


def _example_body(data: str | None, rows: int) -> dict[str, Any]:
    from services.forecasting.data import read_table, request_body, synthetic_frame

    frame = read_table(data) if data else synthetic_frame()
    return request_body(frame.tail(rows))


def _wait_for_version(url: str, version: int | None, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.post(f"{url}/model", timeout=30)
        if response.status_code == 200:
            info = response.json()
            if version is None or str(info.get("version")) == str(version):
                return info
        time.sleep(2)
    return info


def main() -> None:
    started = time.monotonic()
    data = os.environ.get("TESSERA_DATA") or None
    if data:
        data = str(Path(data).resolve())
    console.rule("[bold]Tessera demo")
    with console.status("starting the local stack (Ray head, MLflow, BentoML services)..."):
        stack.up()
    console.print(f"stack up in {time.monotonic() - started:.0f}s; training on {data or 'synthetic data'}")
    results: list[dict[str, Any]] = []
    for domain, model, overrides in DEMO_JOBS:
        console.rule(f"train {domain}/{model}")
        entrypoint = job_entrypoint("pipelines.train", domain, model, data_for(domain, data), overrides)
        code, result = submit_and_follow(entrypoint, stack.dashboard_url(), None)
        if code != 0 or result is None:
            raise SystemExit(f"training {domain}/{model} failed; see the log above")
        results.append(result)

    console.rule("query the services")
    served = {"forecasting": _query_forecasting(results, data_for("forecasting", data)),
              "weather": _query_weather(results, data_for("weather", data)),
              "robot_policy": _query_robot_policy(results)}

    table = Table(title="trained models (Ray jobs, registered in MLflow)")
    for column in ("domain", "model", "version", "promoted", "test metrics", "served now"):
        table.add_column(column)
    for result in results:
        metrics = ", ".join(f"{k[5:]} {v:.4f}" for k, v in result.items() if k.startswith("test_"))
        table.add_row(result["domain"], result["model"], str(result["version"]), str(result["promoted"]), metrics,
                      "yes" if served.get(result["domain"]) == str(result["version"]) else "")
    console.print(table)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s; the stack keeps running (`make down`):")
    console.print(f"  MLflow UI       {stack.mlflow_url()}")
    console.print(f"  Ray dashboard   {stack.dashboard_url()}")
    from shared import registry

    for name in registry.names():
        console.print(f"  {name:<15} {stack.service_url(name)}  (Swagger UI; POST {registry.get(name).endpoint})")


def _production(results: list[dict[str, Any]], domain: str) -> int | None:
    promoted = [r["version"] for r in results if r["domain"] == domain and r["promoted"]]
    return max(promoted) if promoted else None


def _query_forecasting(results: list[dict[str, Any]], data: str | None) -> str:
    url = stack.service_url("forecasting")
    info = _wait_for_version(url, _production(results, "forecasting"))
    body = _example_body(data, int(info.get("seq_len", 96)))
    response = httpx.post(f"{url}/forecast", json={**body, "horizon": 24}, timeout=60)
    response.raise_for_status()
    answer = response.json()
    served = str(answer["model"]["version"])
    shown = answer["columns"][:4]
    forecast = Table(title=f"POST {url}/forecast -> {answer['model']['architecture']} v{served}: first 6 of 24 steps")
    forecast.add_column("timestamp")
    for column in shown:
        forecast.add_column(column, justify="right")
    for i in range(6):
        stamp = answer["timestamps"][i] if answer.get("timestamps") else f"t+{i + 1}"
        forecast.add_row(stamp, *(f"{v:.3f}" for v in answer["values"][i][: len(shown)]))
    console.print(forecast)
    return served


def _query_weather(results: list[dict[str, Any]], data: str | None) -> str:
    """Upload the last state of the training data as netCDF and show the 24 h rollout that comes back."""
    import tempfile

    import numpy as np
    import xarray as xr

    from services.weather.data import open_dataset, synthetic_dataset

    url = stack.service_url("weather")
    info = _wait_for_version(url, _production(results, "weather"))
    source = open_dataset(data) if data else synthetic_dataset(days=20, seed=0)
    state = source.isel(time=slice(-1, None)).drop_vars([v for v in ("lsm", "orography") if v in source])
    files = {"file": ("state.nc", bytes(state.to_netcdf()), "application/x-netcdf")}
    response = httpx.post(f"{url}/forecast", files=files, data={"steps": "4"}, timeout=120)
    response.raise_for_status()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "forecast.nc").write_bytes(response.content)
        rollout = xr.open_dataset(Path(tmp) / "forecast.nc").load()
    weights = np.cos(np.deg2rad(rollout["latitude"].values))[:, None]
    table = Table(title=f"POST {url}/forecast (netCDF in, netCDF out) -> {info.get('architecture')} "
                        f"v{info.get('version')}: latitude-weighted means from {str(state.time.values[0])[:13]}")
    table.add_column("valid time")
    channels = [(v["variable"], v["level"]) for v in info["variables"]]
    for var, level in channels:
        table.add_column(f"{var}{'' if level is None else f' {level:g} hPa'} ({rollout[var].attrs.get('units', '')})",
                         justify="right")
    for k, when in enumerate(rollout.time.values):
        row = []
        for var, level in channels:
            field = rollout[var].isel(time=k)
            field = field.sel(level=level) if level is not None else field
            row.append(f"{float((field.values * weights).sum() / (weights.sum() * field.shape[-1])):.2f}")
        table.add_row(str(when)[:13], *row)
    console.print(table)
    return str(rollout.attrs["model"]).rsplit("v", 1)[-1]


def _query_robot_policy(results: list[dict[str, Any]]) -> str:
    """Plan one chunk for the first evaluation episode's start state (seed 100000) through POST /act."""
    from services.robot_policy.data import make_env

    url = stack.service_url("robot_policy")
    _wait_for_version(url, _production(results, "robot_policy"))
    env = make_env()
    obs, _ = env.reset(seed=100_000)
    env.close()
    body = {"observations": [obs.tolist(), obs.tolist()], "seed": 0}
    response = httpx.post(f"{url}/act", json=body, timeout=60)
    response.raise_for_status()
    answer = response.json()
    served = str(answer["model"]["version"])
    table = Table(title=f"POST {url}/act -> {answer['model']['architecture']} v{served}: energy {answer['energy']:.3f} "
                        f"after {answer['descent_steps']} descent step(s), {answer['latency_ms']:.0f} ms; "
                        f"first 4 of {len(answer['actions'])} actions (execute {answer['execute']})")
    table.add_column("state [agent x, y, block x, y, angle]")
    table.add_column("action x", justify="right")
    table.add_column("action y", justify="right")
    for i in range(4):
        table.add_row(", ".join(f"{v:.1f}" for v in obs) if i == 0 else "", *(f"{v:.1f}" for v in answer["actions"][i]))
    console.print(table)
    return served


if __name__ == "__main__":
    main()
