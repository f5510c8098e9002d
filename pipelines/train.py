"""Training job entry point: ``python -m pipelines.train <domain> [--model M] [--data PATH] [--set k=v ...]``.

Runs on the connected Ray cluster (inside a Ray job, or a local Ray started on the spot), or with ``--no-ray``
in this process alone (debugging; the same trainer); registers the model in MLflow under the domain's name,
moves the alias ``production`` only when the new model beats the current one on validation, and prints one
JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from shared import datapath, registry
from shared.config import parse_overrides, to_dict


class UsageError(ValueError):
    """A job that cannot start as asked (unknown model, bad --init-from): exit code 2 with the reason."""


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The training job's arguments (also ``tessera train``'s, which passes them on to the job)."""
    parser.add_argument("domain", help=f"one of: {', '.join(registry.names())}")
    parser.add_argument("--model", help="model of the domain (default: the domain's first)")
    parser.add_argument("--data", help="data: a path, or an object-store URI such as s3://bucket/ETTh1.parquet "
                                       "(default: the domain's synthetic data)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="settings, e.g. --set epochs=1 d_model=128 (`tessera settings DOMAIN` lists them)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the domain name)")
    parser.add_argument("--no-register", action="store_true", help="train and log only: no registered version")
    parser.add_argument("--init-from", metavar="VERSION|ALIAS", default=None,
                        help="start from the weights of a registered version of this domain's model (e.g. 3 or "
                             "production) instead of a fresh initialisation: fine-tuning or training longer")
    parser.add_argument("--storage", metavar="PATH|URI", default=None,
                        help="Ray Train checkpoints: a folder every node mounts, or a URI (s3://bucket/prefix); "
                             "default $TESSERA_STORAGE, else TESSERA_HOME/ray_results (one machine only)")


def job_arguments(args: argparse.Namespace) -> list[str]:
    """:func:`add_job_arguments`' options of ``args`` back as command-line arguments (after domain, model,
    data and --set, which the job's entry point gets on their own)."""
    out = ["--experiment", args.experiment] if args.experiment else []
    out += ["--no-register"] if args.no_register else []
    out += ["--init-from", args.init_from] if args.init_from else []
    out += ["--storage", args.storage] if getattr(args, "storage", None) else []
    return out


def checkpoint_storage(given: str | None) -> str:
    """Where Ray Train keeps checkpoints: ``--storage``, ``$TESSERA_STORAGE`` or TESSERA_HOME/ray_results. A URI
    is checked through pyarrow (what Ray writes with) before the run starts; a folder is created."""
    from infra import stack

    storage = given or os.environ.get("TESSERA_STORAGE") or str(stack.home() / "ray_results")
    if not datapath.is_uri(storage):
        storage = datapath.normalize(storage)
        Path(storage).mkdir(parents=True, exist_ok=True)
        return storage
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
        filesystem.create_dir(path, recursive=True)
        filesystem.get_file_info(path)
    except Exception as exc:  # no credentials, no bucket, an unknown scheme: the store's reason in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint storage {storage} cannot be used ({first})") from None
    return storage


def warn_if_storage_is_not_shared(ray: Any, storage: str) -> None:
    """A local folder holds checkpoints on one machine only: on a multi-node cluster a worker restarted on
    another node would not find them."""
    if datapath.is_uri(storage):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        print(f"warning: checkpoints go to {storage}, a local folder, on a {len(nodes)}-node cluster: every node "
              f"must mount it at that path (NFS), or pass --storage s3://... (TESSERA_STORAGE)", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__.splitlines()[0])
    add_job_arguments(parser)
    parser.add_argument("--no-ray", action="store_true",
                        help="train in this process with the same trainer, without Ray (one worker; debugging)")
    return parser.parse_args(argv)


def _train_here(domain: registry.Domain, cfg: Any, run_id: str, uri: str, init_weights: bytes | None) -> None:
    """The plain trainer in this process (``--no-ray``), logging to the same MLflow run; on this machine's first
    GPU with ``use_gpu=true``."""
    import torch
    from safetensors.torch import load as load_safetensors

    from pipelines.trainer import Trainer
    from shared.tracking import MlflowTracker

    trainer = Trainer(domain, cfg, tracker=MlflowTracker(uri, run_id),
                      device=torch.device("cuda") if cfg.use_gpu else None,
                      init_weights=load_safetensors(init_weights) if init_weights else None)
    trainer.fit()


def run(argv: list[str] | None = None) -> dict[str, Any]:
    import mlflow

    from shared import tracking

    args = parse_args(argv)
    domain = registry.get(args.domain)
    if args.model and args.model not in domain.models:
        raise UsageError(f"unknown model {args.model!r} for {domain.name}; known: {', '.join(domain.models)}")
    domain.check_dependencies()
    try:
        cfg = domain.make_config(args.model, args.data, parse_overrides(args.overrides))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.no_ray and cfg.ray_workers != 1:
        raise UsageError(f"--no-ray trains in one process; ray_workers={cfg.ray_workers} needs Ray")
    if args.no_ray and cfg.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--no-ray with use_gpu=true trains on this machine's GPU, and torch sees none here")
    if getattr(cfg, "data", None):
        try:
            datapath.require(cfg.data)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    storage = None if args.no_ray else checkpoint_storage(args.storage)
    uri = tracking.check_reachable()
    init_weights, init_tags = None, {}
    if args.init_from:
        try:
            start, meta, init_weights = tracking.registered_weights(tracking.client(uri), domain.name, args.init_from)
        except ValueError as exc:
            raise UsageError(f"--init-from {args.init_from}: {exc}") from None
        trained_as = meta.get("config", {}).get("model")
        if trained_as != getattr(cfg, "model", trained_as):
            raise UsageError(f"--init-from {args.init_from}: {domain.name} v{start.version} is a {trained_as!r} "
                             f"model, this run trains {cfg.model!r}")
        init_tags = {"init_from_version": str(start.version), "init_from_run": start.run_id or ""}
        print(f"starting from the weights of {domain.name} v{start.version} (run {start.run_id})", flush=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(args.experiment or domain.name)
    model_name = getattr(cfg, "model", domain.models[0])
    data_name = datapath.name(cfg.data) if getattr(cfg, "data", None) else "synthetic"
    with mlflow.start_run(run_name=f"{model_name}-{data_name}") as run:
        run_id = run.info.run_id
        mlflow.set_tags({"domain": domain.name, "model": model_name, "data": data_name,
                         "ray_job_id": os.environ.get("RAY_JOB_ID", os.environ.get("RAY_JOB_SUBMISSION_ID", "")),
                         **init_tags})
        params = to_dict(cfg)
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        print(f"MLflow run {run_id} at {uri}", flush=True)
        if args.no_ray:
            _train_here(domain, cfg, run_id, uri, init_weights)
        else:
            from pipelines.ray_train import fit
            from shared.cluster import connect_ray

            assert storage is not None
            warn_if_storage_is_not_shared(connect_ray(), storage)
            fit(domain.name, cfg, run_id=run_id, tracking_uri=uri, storage_path=storage, init_weights=init_weights)

    client = tracking.client(uri)
    finished = client.get_run(run_id)
    metrics = finished.data.metrics
    if f"kept_val_{domain.val_metric}" not in metrics:
        raise RuntimeError(f"run {run_id} finished without final metrics; see the worker logs above")

    result: dict[str, Any] = {"run_id": run_id, "domain": domain.name, "model": model_name,
                              "version": None, "promoted": False}
    result.update({k: v for k, v in metrics.items() if k.startswith(("test_", "best_val_", "kept_", "epochs_run"))})
    result.update({k: int(result[k]) for k in ("epochs_run", "kept_epoch") if k in result})  # MLflow keeps floats
    if not args.no_register:
        signature = finished.data.tags["eval_signature"]
        # The validation score of the weights registered (the last epoch's when the run keeps the last).
        val = float(metrics[f"kept_val_{domain.val_metric}"])
        version = tracking.register(client, domain.name, run_id, tags={
            "model": model_name, "data": data_name, "eval_signature": signature,
            f"val_{domain.val_metric}": f"{val:.6f}"})
        promoted, reason = tracking.promote_if_better(client, domain.name, version, domain.val_metric, val,
                                                      signature)
        result.update(version=int(version.version), promoted=promoted, promotion=reason)
        print(f"registered {domain.name} v{version.version}; "
              f"{'promoted to @production' if promoted else 'not promoted'}: {reason}", flush=True)
    return result


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
