"""``tessera``: start the local stack, submit training jobs to Ray, query the services.

    tessera up | status | down                  the local stack (Ray head, MLflow, BentoML services)
    tessera train DOMAIN [--model M] [--data PATH] [--set k=v ...] [--address URL]
    tessera evaluate DOMAIN [--version V [--promote]] [--data PATH] [--set k=v ...] [--address URL]
    tessera models DOMAIN                       registered versions, their aliases, scores and signatures
    tessera promote DOMAIN VERSION | rollback DOMAIN   move @production on purpose, or back
    tessera settings DOMAIN [--model M] [--evaluation]  every setting with its default and what it does
    tessera predict DOMAIN FILE [--horizon H] [--output OUT] [--url URL]
                                                send a file to the domain's service through its client (a CSV
                                                history, a netCDF state, a JSON body: `tessera example`)
    tessera example DOMAIN [--data PATH] [-o FOLDER]   write an input file `tessera predict DOMAIN` accepts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# (Ray leaves out .git and .venv by itself.)
WORKING_DIR_EXCLUDES = [".tessera", "**/__pycache__", "*.egg-info", "data", "mlruns", ".pytest_cache",
                        ".ruff_cache", ".mypy_cache", ".hypothesis", "schemathesis-report", "bench_results"]


def _cmd_up(args: argparse.Namespace) -> int:
    from infra import stack

    with console.status("starting Ray head, MLflow server and BentoML services..."):
        stack.up(args.domains or None, num_cpus=args.num_cpus)
    return _cmd_status(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from infra import stack

    rows = stack.status(args.domains or None)
    table = Table(title=f"Tessera local stack ({stack.home()})")
    for column in ("component", "url", "pid", "state"):
        table.add_column(column)
    for row in rows:
        state = "[green]healthy[/]" if row["healthy"] else "[red]down[/]"
        table.add_row(str(row["component"]), str(row["url"]), str(row["pid"] or "-"), state)
    Console().print(table)
    return 0 if all(r["healthy"] for r in rows) else 1


def _cmd_down(args: argparse.Namespace) -> int:
    from infra import stack

    with console.status("stopping the local stack..."):
        stack.down(args.domains or None)
    console.print(f"stopped; state kept in {stack.home()}")
    return 0


def job_entrypoint(module: str, domain: str, model: str | None, data: str | None, overrides: list[str],
                   extra: list[str] | None = None) -> str:
    argv = ["python", "-m", module, domain]
    if model:
        argv += ["--model", model]
    if data:
        argv += ["--data", data]
    if overrides:
        argv += ["--set", *overrides]
    return shlex.join(argv + list(extra or []))


def _runtime_env(address: str, tracking_uri: str | None) -> dict[str, Any]:
    """Environment of the job driver. Drivers don't inherit this shell's environment, so the MLflow URI is
    passed explicitly: the given one, else the embedded stack's when this address is that stack's Ray."""
    from infra import stack

    env_vars: dict[str, str] = {"PYTHONUNBUFFERED": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    elif address.rstrip("/") == stack.dashboard_url() and stack.components([])[0].pid() is not None:
        env_vars["MLFLOW_TRACKING_URI"] = stack.mlflow_url()
    if "TESSERA_FAIL_ONCE_AT_EPOCH" in os.environ:  # fault injection (tests)
        env_vars["TESSERA_FAIL_ONCE_AT_EPOCH"] = os.environ["TESSERA_FAIL_ONCE_AT_EPOCH"]
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if (PROJECT_ROOT / "pyproject.toml").exists():  # ship this checkout's code so the cluster runs it
        runtime_env["working_dir"] = str(PROJECT_ROOT)
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES
    return runtime_env


def _use_ray_token_if_present() -> None:
    """Ray starts clusters with token authentication when ~/.ray/auth_token (or RAY_AUTH_TOKEN) exists;
    the jobs client only sends the token once token mode is switched on in this process as well."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def submit_and_follow(entrypoint: str, address: str, tracking_uri: str | None,
                      follow: bool = True) -> tuple[int, dict[str, Any] | None]:
    """Submit a Ray job, stream its logs, and return (exit code, the job's final JSON line). Ctrl-C stops
    following, not the job (the message says how to follow or stop it)."""
    import logging

    from ray.job_submission import JobStatus, JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # (after Ray set up its logging) not a line per file packaged
    _use_ray_token_if_present()
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=_runtime_env(address, tracking_uri))
    except (ConnectionError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreachableError(f"cannot submit to Ray at {address} ({first}): start the local stack with "
                               f"`tessera up`, or pass --address (or set RAY_ADDRESS) to a Ray dashboard URL") from None
    console.print(f"submitted [bold]{job_id}[/] to {address}: {entrypoint}")
    if not follow:
        return 0, None
    last_json: dict[str, Any] | None = None

    async def stream() -> None:
        nonlocal last_json
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                print(line, flush=True)
                if line.startswith("{") and line.endswith("}"):
                    with contextlib.suppress(json.JSONDecodeError):
                        last_json = json.loads(line)

    try:
        asyncio.run(stream())
        status = client.get_job_status(job_id)
        while not status.is_terminal():
            time.sleep(1)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        console.print(f"stopped following; job {job_id} goes on. Follow it again with `ray job logs -f {job_id} "
                      f"--address {address}`, stop it with `ray job stop {job_id} --address {address}`")
        return 130, None
    ok = status == JobStatus.SUCCEEDED
    console.print(f"job {job_id}: [{'green' if ok else 'red'}]{status.value}[/]")
    return (0 if ok else 1), last_json


class UnreachableError(ConnectionError):
    """Ray or MLflow does not answer: one line naming the URL and what to do."""


def _resolve_data(data: str | None, address: str | None = None) -> str | None:
    """``--data`` as the job will read it: a URI as given; a local file absolute (the job runs from its own
    working directory). A path absent here is an error when the job runs on this machine (the local stack's
    Ray); for another cluster it may be a path on its nodes (``/data/...`` in the compose stack): a note."""
    from infra import stack
    from shared import datapath

    if not data or datapath.is_uri(data):
        return data
    if Path(data).exists():
        return datapath.normalize(data)
    if address is None or address.rstrip("/") == stack.dashboard_url():
        raise FileNotFoundError(f"--data {data}: no such file or folder on this machine, where the job runs")
    console.print(f"note: {data} is not on this machine; the job reads it on the cluster at {address}")
    return data


def _cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train import job_arguments
    from shared import registry
    from shared.config import parse_overrides

    domain = registry.get(args.domain)
    try:  # the same checks the job makes, before any code is uploaded
        if args.model and args.model not in domain.models:
            raise ValueError(f"unknown model {args.model!r} for {domain.name}; known: {', '.join(domain.models)}")
        domain.make_config(args.model, None, parse_overrides(args.overrides))
    except ValueError as exc:
        console.print(f"[red]{exc}")
        return 2
    data = _resolve_data(args.data, args.address)
    entrypoint = job_entrypoint("pipelines.train", domain.name, args.model, data, args.overrides, job_arguments(args))
    code, result = submit_and_follow(entrypoint, args.address, args.tracking_uri, follow=not args.no_wait)
    if result:
        console.print(_result_table("training result", result))
    return code


def _result_table(title: str, result: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("key")
    table.add_column("value")
    for key, value in result.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, text if len(text) < 120 else text[:117] + "...")
    return table


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluate import UsageError, check_usage, job_arguments, settings_for
    from shared import registry

    domain = registry.get(args.domain)
    problem = check_usage(domain, args)
    if problem is None:
        try:
            settings_for(domain, args)
        except UsageError as exc:
            problem = str(exc)
    if problem:
        console.print(f"[red]{problem}")
        return 2
    data = _resolve_data(args.data, args.address)
    entrypoint = job_entrypoint("pipelines.evaluate", domain.name, None, data, args.overrides, job_arguments(args))
    code, result = submit_and_follow(entrypoint, args.address, args.tracking_uri, follow=not args.no_wait)
    if result:
        console.print(_result_table("evaluation result", result))
    return code


def _registry(args: argparse.Namespace) -> Any:
    """An MLflow client for the registry commands: --tracking-uri, else $MLFLOW_TRACKING_URI, else the local
    stack's MLflow; a one-line error at once when it does not answer."""
    from infra import stack
    from shared.tracking import check_reachable, client

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or stack.mlflow_url()
    return client(check_reachable(uri))


def _cmd_models(args: argparse.Namespace) -> int:
    from shared import registry
    from shared.tracking import list_versions

    domain = registry.get(args.domain)
    versions = list_versions(_registry(args), domain.name)
    if not versions:
        console.print(f"no {domain.name} model is registered yet; train one with `tessera train {domain.name}`")
        return 1
    table = Table(title=f"registered {domain.name} models (newest first)")
    for column in ("version", "aliases", "created", "model", "scores", "evaluation signature", "run"):
        table.add_column(column)
    for v in versions:
        tags = v["tags"]
        scores = ", ".join(f"{k} {float(val):.4f}" for k, val in tags.items() if k.startswith(("val_", "score_"))
                           and k != "score_signature")
        signature = tags.get("eval_signature", "")
        table.add_row(str(v["version"]), ", ".join(f"@{a}" for a in v["aliases"]), v["created"], tags.get("model", ""),
                      scores, signature if len(signature) <= 40 else signature[:37] + "...", (v["run_id"] or "")[:12])
    Console().print(table)
    return 0


def _version(mlflow: Any, name: str, version: str) -> Any | None:
    """The registered version ``version`` (a number or an alias) of ``name``, or None after printing why not."""
    from shared.tracking import resolve_version

    try:
        return resolve_version(mlflow, name, version)
    except ValueError as exc:
        console.print(f"[red]{exc}")
        return None


def _cmd_promote(args: argparse.Namespace) -> int:
    from shared import registry
    from shared.tracking import PRODUCTION, move_alias

    domain = registry.get(args.domain)
    mlflow = _registry(args)
    version = _version(mlflow, domain.name, str(args.version))
    if version is None:
        return 2
    before = move_alias(mlflow, domain.name, str(version.version))
    mlflow.set_model_version_tag(domain.name, str(version.version), "promoted", "by hand (tessera promote)")
    console.print(f"{domain.name} @{PRODUCTION}: {'v' + before if before else 'none'} -> v{version.version}; the "
                  f"services serve it within seconds (`tessera rollback {domain.name}` goes back)")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from shared import registry
    from shared.tracking import PRODUCTION, rollback

    domain = registry.get(args.domain)
    try:
        was, now = rollback(_registry(args), domain.name)
    except ValueError as exc:
        console.print(f"[red]{exc}")
        return 2
    console.print(f"{domain.name} @{PRODUCTION}: v{was} -> v{now}")
    return 0


def _cmd_bento(args: argparse.Namespace) -> int:
    """Import a registered version into BentoML's model store and build the domain's Bento around it."""
    import subprocess

    import bentoml

    from shared import registry
    from shared.serving import bento_model_name
    domain = registry.get(args.domain)
    bentofile = PROJECT_ROOT / "services" / domain.name / "bentofile.yaml"
    if not bentofile.exists():
        console.print(f"[red]{bentofile} is missing: `python -m infra.bentofiles` writes it")
        return 2
    mlflow = _registry(args)
    version = _version(mlflow, domain.name, str(args.version))
    if version is None:
        return 2
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.tracking_uri  # bentoml.mlflow reads models:/ URIs through it
    model = bentoml.mlflow.import_model(bento_model_name(domain.name), f"models:/{domain.name}/{version.version}",
                                        labels={"domain": domain.name, "registered_version": str(version.version),
                                                "run_id": version.run_id or ""})
    console.print(f"imported {domain.name} v{version.version} as BentoML model {model.tag}")
    done = subprocess.run([_bentoml(), "build", "-f", str(bentofile), str(PROJECT_ROOT), "--output", "tag"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        console.print(f"[red]bentoml build failed:\n{done.stderr[-3000:]}")
        return 1
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    console.print(f"built Bento {tag} serving {domain.name} v{version.version}: `bentoml serve {tag}` runs it "
                  f"without the registry, `bentoml containerize {tag}` makes its image")
    print(tag)
    return 0


def _bentoml() -> str:
    local = Path(sys.executable).parent / "bentoml"
    return str(local) if local.exists() else "bentoml"


def _cmd_settings(args: argparse.Namespace) -> int:
    from shared import registry
    from shared.config import describe

    domain = registry.get(args.domain)
    if args.evaluation:
        if domain.eval_config_cls is None:
            console.print(f"[red]{domain.name} has no evaluation pipeline")
            return 2
        cfg, what = domain.eval_config_cls(), "evaluation settings (tessera evaluate --set)"
    else:
        try:
            cfg = domain.make_config(args.model)
            what = f"{args.model or domain.models[0]} settings (tessera train --set)"
        except ValueError as exc:
            console.print(f"[red]{exc}")
            return 2
    table = Table(title=f"{domain.name}: {what}")
    for column in ("setting", "default", "type", "what it does"):
        table.add_column(column, overflow="fold")
    for row in describe(cfg):
        table.add_row(row["name"], row["value"], row["type"], row["comment"])
    Console().print(table)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from infra.stack import service_url
    from shared import registry
    from shared.client import ServiceError

    domain = registry.get(args.domain)
    url = args.url or service_url(domain.name)
    try:
        prediction = domain.predict(url, Path(args.file), horizon=args.horizon,
                                    output=Path(args.output) if args.output else None)
    except ServiceError as exc:
        console.print(f"[red]{exc}")
        return 1
    except (OSError, ValueError) as exc:  # the input file is missing or not of the domain's kind
        console.print(f"[red]{args.file}: {exc}")
        return 2
    if prediction.text is not None:
        print(prediction.text, end="" if prediction.text.endswith("\n") else "\n")
    console.print(prediction.summary)
    if prediction.output is not None:
        console.print(f"wrote {prediction.output}")
    console.print(f"model {domain.name} v{prediction.version}")
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from shared import registry

    domain = registry.get(args.domain)
    folder = Path(args.output or ".")
    folder.mkdir(parents=True, exist_ok=True)
    path = domain.example_input(folder, _resolve_data(args.data))
    console.print(f"wrote {path}; send it with `tessera predict {domain.name} {path}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera",
                                     description="Tessera: train on Ray, track in MLflow, serve with BentoML")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("up", _cmd_up, "start the local stack"), ("status", _cmd_status, "show the local stack"),
                             ("down", _cmd_down, "stop the local stack (state is kept)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--domains", nargs="*", help="services to include (default: every registered domain)")
        if name == "up":
            p.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
        p.set_defaults(func=func)
    from pipelines import evaluate as evaluation_job
    from pipelines import train as training_job

    train = sub.add_parser("train", help="submit a training job to Ray and follow it",
                           description="Submit `python -m pipelines.train` to Ray with these arguments and follow it.")
    training_job.add_job_arguments(train)
    train.set_defaults(func=_cmd_train)
    evaluate = sub.add_parser("evaluate", help="submit an evaluation job (the production model) to Ray and follow it",
                              description="Submit `python -m pipelines.evaluate` to Ray and follow it.")
    evaluation_job.add_job_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)
    for job in (train, evaluate):
        job.add_argument("--address", default=os.environ.get("RAY_ADDRESS", DEFAULT_ADDRESS)
                         if os.environ.get("RAY_ADDRESS", "").startswith("http") else DEFAULT_ADDRESS,
                         help="Ray jobs address (default: $RAY_ADDRESS or %(default)s)")
        job.add_argument("--tracking-uri", default=None,
                         help="MLflow URI as seen from the cluster (default: the cluster's own setting)")
        job.add_argument("--no-wait", action="store_true", help="submit and return")
    models = sub.add_parser("models", help="list a domain's registered versions, aliases, scores and signatures")
    promote = sub.add_parser("promote", help="move @production to a version (by hand; rollback goes back)")
    rollback = sub.add_parser("rollback", help="move @production back to the version that held it before")
    for command, func in ((models, _cmd_models), (promote, _cmd_promote), (rollback, _cmd_rollback)):
        command.add_argument("domain")
        command.add_argument("--tracking-uri", default=None,
                             help="MLflow (default: $MLFLOW_TRACKING_URI or the local stack's)")
        command.set_defaults(func=func)
    promote.add_argument("version", help="version number (or an alias such as staging)")
    bento = sub.add_parser("bento", help="build a domain's Bento carrying a registered version (bentoml build)")
    bento.add_argument("domain")
    bento.add_argument("--version", default="production", help="version number or alias (default: production)")
    bento.add_argument("--tracking-uri", default=None,
                       help="MLflow (default: $MLFLOW_TRACKING_URI or the local stack's)")
    bento.set_defaults(func=_cmd_bento)
    settings = sub.add_parser("settings", help="list a domain's settings with their defaults and what they do")
    settings.add_argument("domain")
    settings.add_argument("--model", help="the model whose defaults to show (default: the domain's first)")
    settings.add_argument("--evaluation", action="store_true", help="the evaluation pipeline's settings instead")
    settings.set_defaults(func=_cmd_settings)
    predict = sub.add_parser("predict", help="send an input file to a domain's service through its client")
    predict.add_argument("domain")
    predict.add_argument("file")
    predict.add_argument("--horizon", type=int, help="steps to forecast, where the domain forecasts")
    predict.add_argument("--url", help="service URL (default: the local stack's)")
    predict.add_argument("--output", "-o", help="write the answer here (default: stdout, or the domain's file name)")
    predict.set_defaults(func=_cmd_predict)
    example = sub.add_parser("example", help="write an input file that `tessera predict DOMAIN` accepts")
    example.add_argument("domain")
    example.add_argument("--data", help="take it from this data file (default: the domain's synthetic data)")
    example.add_argument("--output", "-o", help="folder to write it in (default: the current one)")
    example.set_defaults(func=_cmd_example)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except KeyError as exc:  # unknown domain
        console.print(f"[red]{exc.args[0]}")
        sys.exit(2)
    except ConnectionError as exc:  # Ray or MLflow does not answer: one line, no traceback
        console.print(f"[red]{exc}")
        sys.exit(1)
    except FileNotFoundError as exc:  # --data that is not there
        console.print(f"[red]{exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
