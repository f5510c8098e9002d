"""Evaluation job: ``python -m pipelines.evaluate <domain> [--version V] [--data PATH] [--set k=v ...]``.

Loads a registered model (``@production`` unless ``--version``/``--alias`` say otherwise), runs the domain's
evaluation pipeline on the connected Ray cluster (or a local one), logs the settings, metrics, plots and files
to a new MLflow run in the domain's experiment, tags the model version with the run, and prints one JSON
object (the metrics, with the model version) as its last line. ``tessera evaluate`` submits it as a Ray job.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from shared import registry
from shared.config import parse_overrides


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, registry.Domain]:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("domain", nargs="?")
    known, _ = first.parse_known_args(argv)
    domain = registry.get(known.domain) if known.domain in registry.names() else None

    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("domain", choices=registry.names())
    parser.add_argument("--version", help="registered model version (default: the one holding --alias)")
    parser.add_argument("--alias", default="production", help="registry alias to evaluate (default: production)")
    parser.add_argument("--data", help="evaluation data (default: what the model was trained on, or synthetic)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="evaluation settings, e.g. --set episodes=10")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the domain name)")
    for key, default in (domain.eval_settings if domain else {}).items():
        parser.add_argument(f"--{key.replace('_', '-')}", dest=f"eval_{key}", type=type(default) if default is not None else str,
                            default=None, help=f"evaluation setting {key} (default {default})")
    args = parser.parse_args(argv)
    return args, registry.get(args.domain)


def settings_for(domain: registry.Domain, args: argparse.Namespace) -> dict[str, Any]:
    """The domain's defaults, then ``--set``, then the dedicated flags; unknown keys are refused."""
    settings: dict[str, Any] = dict(domain.eval_settings)
    overrides = parse_overrides(args.overrides)
    for key, value in overrides.items():
        if key not in settings:
            raise SystemExit(f"unknown evaluation setting {key!r} for {domain.name}; known: {', '.join(settings)}")
        default = settings[key]
        settings[key] = type(default)(value) if default is not None and not isinstance(default, bool) else value
    for key in domain.eval_settings:
        flag = getattr(args, f"eval_{key}", None)
        if flag is not None:
            settings[key] = flag
    return settings


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a nested metrics object as MLflow metric names (lists become name_0, name_1, ...)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or isinstance(value, int | float) and math.isfinite(float(value)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(_flat_metrics(value, f"{name}."))
        elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
            out.update({f"{name}_{i}": float(v) for i, v in enumerate(value) if math.isfinite(float(v))})
    return out


def run(argv: list[str] | None = None) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    import mlflow

    from pipelines.train import _connect_ray
    from shared import tracking

    args, domain = parse_args(argv)
    settings = settings_for(domain, args)
    uri = tracking.tracking_uri()
    loaded = tracking.load_registered(domain.name, args.alias, uri, version_number=args.version)
    if loaded is None:
        raise SystemExit(f"no {domain.name} model holds @{args.alias}; train one with `tessera train {domain.name}`")
    print(f"evaluating {domain.name} v{loaded.version} ({getattr(loaded.cfg, 'model', '')}, run {loaded.run_id})",
          flush=True)
    _connect_ray()
    result = domain.evaluation(loaded.model.eval(), loaded.cfg, loaded.info, args.data, settings)

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(args.experiment or domain.name)
    with mlflow.start_run(run_name=f"evaluate-v{loaded.version}") as run:
        mlflow.set_tags({"domain": domain.name, "kind": "evaluation", "model_version": str(loaded.version),
                         "model_run_id": str(loaded.run_id)})
        mlflow.log_params({f"eval.{k}": v for k, v in settings.items()} | {"data": args.data or ""})
        mlflow.log_metrics(_flat_metrics(result.metrics))
        mlflow.log_dict(result.metrics, "evaluation.json")
        for name, fig in result.figures.items():
            mlflow.log_figure(fig, f"plots/{name}")
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in result.files.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                mlflow.log_artifact(str(path), artifact_path=str(Path("files") / Path(name).parent).rstrip("/."))
        eval_run_id = run.info.run_id
    tracking.client(uri).set_model_version_tag(domain.name, str(loaded.version), "last_evaluation_run", eval_run_id)
    print(f"MLflow evaluation run {eval_run_id} at {uri}", flush=True)
    return {**result.metrics, "version": int(loaded.version) if loaded.version else None, "run_id": eval_run_id}


def main(argv: list[str] | None = None) -> None:
    result = run(argv)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
