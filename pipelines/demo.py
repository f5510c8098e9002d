"""``make demo``: start the local stack, train every available domain model on Ray, query the services.

Trains on the synthetic default data, or on ``TESSERA_DATA`` (a CSV/Parquet path) when given, with short
settings so the whole demo fits in a few minutes on 2 CPU cores; leaves the stack running.
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
]


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
        entrypoint = job_entrypoint("pipelines.train", domain, model, data, overrides)
        code, result = submit_and_follow(entrypoint, stack.dashboard_url(), None)
        if code != 0 or result is None:
            raise SystemExit(f"training {domain}/{model} failed; see the log above")
        results.append(result)

    console.rule("query the services")
    url = stack.service_url("forecasting")
    production = max((r for r in results if r["promoted"]), key=lambda r: r["version"], default=None)
    info = _wait_for_version(url, production["version"] if production else None)
    body = _example_body(data, int(info.get("seq_len", 96)))
    response = httpx.post(f"{url}/forecast", json={**body, "horizon": 24}, timeout=60)
    response.raise_for_status()
    answer = response.json()
    served = str(answer["model"]["version"])

    table = Table(title="trained models (Ray jobs, registered in MLflow)")
    for column in ("domain", "model", "version", "promoted", "test MSE", "test MAE", "served now"):
        table.add_column(column)
    for result in results:
        table.add_row(result["domain"], result["model"], str(result["version"]), str(result["promoted"]),
                      f"{result['test_mse']:.4f}", f"{result['test_mae']:.4f}",
                      "yes" if served == str(result["version"]) else "")
    console.print(table)
    shown = answer["columns"][:4]
    forecast = Table(title=f"POST {url}/forecast -> {answer['model']['architecture']} v{served}: first 6 of 24 steps")
    forecast.add_column("timestamp")
    for column in shown:
        forecast.add_column(column, justify="right")
    for i in range(6):
        stamp = answer["timestamps"][i] if answer.get("timestamps") else f"t+{i + 1}"
        forecast.add_row(stamp, *(f"{v:.3f}" for v in answer["values"][i][: len(shown)]))
    console.print(forecast)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s; the stack keeps running (`make down`):")
    console.print(f"  MLflow UI       {stack.mlflow_url()}")
    console.print(f"  Ray dashboard   {stack.dashboard_url()}")
    from shared import registry

    for name in registry.names():
        console.print(f"  {name:<15} {stack.service_url(name)}  (Swagger UI; POST {registry.get(name).endpoint})")


if __name__ == "__main__":
    main()
