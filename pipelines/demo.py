"""``make demo``: start the local stack, train every domain's demo models on Ray, query every service.

Trains on the synthetic default data, or on ``TESSERA_DATA`` when given (each domain takes it when the file is
of a kind it reads best, ``Domain.data_match``: a CSV/Parquet table, a netCDF/GRIB file, a Push-T replay buffer
``.zarr``...), with each domain's short demo settings so the whole demo fits in a few minutes on 2 CPU cores;
then sends each service the example input of its domain through the domain's own client (what
``tessera predict`` does) and leaves the stack running.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from infra import stack
from pipelines.cli import job_entrypoint, submit_and_follow
from shared import registry
from shared.client import wait_for_model

console = Console(width=max(110, Console().width))  # tables stay readable under make / CI logs


def data_for(domain: registry.Domain, data: str | None, domains: list[registry.Domain]) -> str | None:
    """``TESSERA_DATA`` for the domains of ``domains`` that match it best (``Domain.data_match``); the others
    train on their synthetic data."""
    if not data:
        return None
    best = max(d.data_match(data) for d in domains)
    return data if best > 0 and domain.data_match(data) == best else None


def _production(results: list[dict[str, Any]], domain: str) -> int | None:
    promoted = [r["version"] for r in results if r["domain"] == domain and r["promoted"]]
    return max(promoted) if promoted else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=(__doc__ or "").split("\n\n")[0].replace("\n", " "),
        epilog="TESSERA_DATA=FILE trains on that file instead of the synthetic data (each domain takes it when "
               "it reads its kind); TESSERA_HOME sets where the stack keeps its state (default .tessera/).")
    parser.parse_args(argv)
    started = time.monotonic()
    data = os.environ.get("TESSERA_DATA") or None
    if data:
        data = str(Path(data).resolve())
    console.rule("[bold]Tessera demo")
    with console.status("starting the local stack (Ray head, MLflow, BentoML services)..."):
        stack.up()
    console.print(f"stack up in {time.monotonic() - started:.0f}s; training on {data or 'synthetic data'}")
    results: list[dict[str, Any]] = []
    domains = [registry.get(name) for name in registry.installed()]
    skipped = sorted(set(registry.names()) - {d.name for d in domains})
    if skipped:
        console.print(f"skipping {', '.join(skipped)}: its pip extra is not installed (`make install` installs all)")
    for domain in domains:
        for job in domain.demo_jobs:
            console.rule(f"train {domain.name}/{job.model}")
            entrypoint = job_entrypoint("pipelines.train", domain.name, job.model, data_for(domain, data, domains),
                                        list(job.overrides))
            code, result = submit_and_follow(entrypoint, stack.dashboard_url(), None)
            if code != 0 or result is None:
                raise SystemExit(f"training {domain.name}/{job.model} failed; see the log above")
            results.append(result)

    console.rule("query the services")
    served: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for domain in domains:
            if not domain.demo_jobs:
                continue
            url = stack.service_url(domain.name)
            wait_for_model(url, _production(results, domain.name))
            source = domain.example_input(Path(tmp), data_for(domain, data, domains))
            prediction = domain.predict(url, source, output=Path(tmp) / f"{domain.name}-answer")
            console.print(prediction.summary)
            served[domain.name] = prediction.version

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
    for domain in domains:
        console.print(f"  {domain.name:<15} {stack.service_url(domain.name)}  (Swagger UI; POST {domain.endpoint})")


if __name__ == "__main__":
    main()
