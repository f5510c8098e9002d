"""Evaluation job: ``python -m pipelines.evaluate <domain> [--version V] [--data PATH] [--set k=v ...]``.

Loads a registered model (``@production`` unless ``--version``/``--alias`` say otherwise), runs the domain's
evaluation pipeline (on the connected Ray cluster where the domain uses Ray tasks), logs the settings,
metrics, plots and files to a new MLflow run in the domain's experiment, tags the model version with the run
(and, for domains with an evaluation score, with that score and the settings it was measured with), and
prints one JSON object (the metrics, with the model version) as its last line. ``tessera evaluate`` submits
it as a Ray job.

The settings are the domain's typed evaluation config (``--set key=value``, or ``--key value``), parsed and
validated like training settings.

``--promote`` (domains with an evaluation score, e.g. robot_policy's closed-loop coverage) moves
``@production`` to the evaluated version when it beats the production version's score measured with the same
settings; a production version not yet scored with them is evaluated in the same job first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from shared import datapath, registry
from shared.config import apply_overrides, parse_overrides, to_dict


class UsageError(ValueError):
    """An evaluation that cannot run as asked: exit code 2 with the reason."""


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation job's arguments (also ``tessera evaluate``'s, which passes them on to the job)."""
    parser.add_argument("domain", choices=registry.names())
    parser.add_argument("--version", help="registered model version (default: the one holding --alias)")
    parser.add_argument("--alias", default="production", help="registry alias to evaluate (default: production)")
    parser.add_argument("--data", help="evaluation data (default: what the model was trained on, or synthetic)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="evaluation settings, e.g. --set episodes=10 (`tessera settings DOMAIN --evaluation`)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the domain name)")
    parser.add_argument("--promote", action="store_true",
                        help="move @production to this version if it beats production's evaluation score "
                             "(measured with the same settings; production is evaluated first when it is not)")


def job_arguments(args: argparse.Namespace) -> list[str]:
    """:func:`add_job_arguments`' options of ``args`` as command-line arguments (after domain, data and --set)."""
    out = ["--version", str(args.version)] if args.version else []
    out += ["--alias", args.alias] if args.alias and args.alias != "production" else []
    out += ["--experiment", args.experiment] if args.experiment else []
    return out + (["--promote"] if args.promote else [])


def check_usage(domain: registry.Domain, args: argparse.Namespace) -> str | None:
    """Why these arguments cannot run (None: they can)."""
    if domain.eval_config_cls is None:
        return f"{domain.name} has no evaluation pipeline; its training job reports test metrics"
    if args.promote and domain.eval_score is None:
        return (f"--promote: {domain.name} has no evaluation score to rank models on; its training job promotes on "
                f"the validation metric")
    if args.promote and not args.version:
        return "--promote needs --version: the version to evaluate and promote"
    return None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, registry.Domain]:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("domain", nargs="?")
    known, _ = first.parse_known_args(argv)
    domain = registry.get(known.domain) if known.domain in registry.names() else None

    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.splitlines()[0])
    add_job_arguments(parser)
    if domain is not None and domain.eval_config_cls is not None:
        for f in dataclasses.fields(domain.eval_config_cls):
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"eval_{f.name}", default=None,
                                help=f"evaluation setting {f.name} (default {f.default!r})")
    args = parser.parse_args(argv)
    domain = registry.get(args.domain)
    problem = check_usage(domain, args)
    if problem:
        parser.error(problem)
    return args, domain


def settings_for(domain: registry.Domain, args: argparse.Namespace) -> Any:
    """The domain's evaluation config: its defaults, then ``--set``, then the dedicated flags (parsed to the
    declared types and validated; an unknown key is an error listing the known ones)."""
    assert domain.eval_config_cls is not None
    overrides = parse_overrides(args.overrides)
    for f in dataclasses.fields(domain.eval_config_cls):
        flag = getattr(args, f"eval_{f.name}", None)
        if flag is not None:
            overrides[f.name] = flag
    try:
        return apply_overrides(domain.eval_config_cls(), overrides)
    except ValueError as exc:
        raise UsageError(f"{domain.name} evaluation: {exc}") from None


def score_signature(settings: Any, data: str | None) -> str:
    """What an evaluation score depends on: scores are compared only between equal signatures."""
    values = to_dict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return json.dumps({"data": data or "", **values}, sort_keys=True, default=str)


def _score(domain: registry.Domain, loaded: Any, data: str | None, settings: Any, signature: str,
           mlflow_client: Any) -> None:
    """Evaluate ``loaded`` (metrics only) and tag its version with the score: used for a production version
    that has no score for these settings yet."""
    import matplotlib.pyplot as plt

    assert domain.eval_score is not None
    print(f"scoring {domain.name} v{loaded.version} (@production) with the same settings", flush=True)
    result = domain.evaluation(loaded.model.eval(), loaded.cfg, loaded.state, data, settings)
    for fig in result.figures.values():
        plt.close(fig)
    _tag_score(domain, mlflow_client, str(loaded.version), float(result.metrics[domain.eval_score[0]]), signature)


def _tag_score(domain: registry.Domain, mlflow_client: Any, version: str, value: float, signature: str) -> None:
    assert domain.eval_score is not None
    mlflow_client.set_model_version_tag(domain.name, version, f"score_{domain.eval_score[0]}", f"{value:.6f}")
    mlflow_client.set_model_version_tag(domain.name, version, "score_signature", signature)


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

    from shared import tracking

    args, domain = parse_args(argv)
    domain.check_dependencies()
    settings = settings_for(domain, args)
    if args.data:  # (as given: it is part of the score's signature, which earlier scores were written with)
        try:
            datapath.require(args.data, "evaluation data")
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    uri = tracking.check_reachable()
    loaded = tracking.load_registered(domain.name, args.alias, uri, version_number=args.version)
    if loaded is None:
        raise UsageError(f"no {domain.name} model holds @{args.alias}; train one with `tessera train {domain.name}`")
    print(f"evaluating {domain.name} v{loaded.version} ({getattr(loaded.cfg, 'model', '')}, run {loaded.run_id})",
          flush=True)
    try:
        result = domain.evaluation(loaded.model.eval(), loaded.cfg, loaded.state, args.data, settings)
    except ValueError as exc:  # data that does not fit the model, a period too short for the settings
        raise UsageError(f"{domain.name} evaluation of v{loaded.version}: {exc}") from exc

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(args.experiment or domain.name)
    with mlflow.start_run(run_name=f"evaluate-v{loaded.version}") as run:
        mlflow.set_tags({"domain": domain.name, "kind": "evaluation", "model_version": str(loaded.version),
                         "model_run_id": str(loaded.run_id)})
        mlflow.log_params({f"eval.{k}": v for k, v in to_dict(settings).items()} | {"data": args.data or ""})
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
    mlflow_client = tracking.client(uri)
    mlflow_client.set_model_version_tag(domain.name, str(loaded.version), "last_evaluation_run", eval_run_id)
    print(f"MLflow evaluation run {eval_run_id} at {uri}", flush=True)
    out: dict[str, Any] = {**result.metrics, "version": int(loaded.version) if loaded.version else None,
                           "run_id": eval_run_id}
    if domain.eval_score is not None:
        metric, higher = domain.eval_score
        signature = score_signature(settings, args.data)
        _tag_score(domain, mlflow_client, str(loaded.version), float(result.metrics[metric]), signature)
        if args.promote:
            version = mlflow_client.get_model_version(domain.name, str(loaded.version))
            current = tracking.production_version(mlflow_client, domain.name)
            if (current is not None and current.version != version.version
                    and current.tags.get("score_signature") != signature):
                held = tracking.load_registered(domain.name, uri=uri, version_number=str(current.version))
                _score(domain, held, args.data, settings, signature, mlflow_client)
            promoted, reason = tracking.promote_if_better(
                mlflow_client, domain.name, version, metric, float(result.metrics[metric]), signature,
                prefix="score_", signature_tag="score_signature", higher_is_better=higher)
            print(f"{domain.name} v{loaded.version} {'promoted to @production' if promoted else 'not promoted'}: "
                  f"{reason}", flush=True)
            out.update(promoted=promoted, promotion=reason)
    return out


def main(argv: list[str] | None = None) -> None:
    try:
        result = run(argv)
    except (UsageError, ImportError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
