"""Ray Train adapter of :class:`pipelines.trainer.Trainer`: ``TorchTrainer`` workers with per-epoch checkpoints.

Each worker builds the plain trainer with its rank and world size, Ray's ``prepare_model`` (DDP, or none for
losses that differentiate through a gradient) and ``prepare_data_loader`` (the training data sharded across
workers, moved to the device); it resumes from the last reported checkpoint after a failure, reports each
epoch's record with a checkpoint written by rank 0, and logs to MLflow from rank 0 only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipelines.trainer import Trainer, _print
from shared import registry
from shared.config import from_dict, to_dict

FAIL_ONCE_ENV = "TESSERA_FAIL_ONCE_AT_EPOCH"  # fault injection for tests: "<epoch>:<marker file>"
CHECKPOINT_FILE = "state.pt"


def _maybe_fail(epoch: int) -> None:
    """Kill this worker once at the start of ``epoch`` (tests of resume-after-failure)."""
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if epoch == int(at) and marker and not Path(marker).exists():
        import ray.train

        # Die like a crashed node would mid-epoch: after the last epoch's checkpoint was committed.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=60)
        Path(marker).write_text("failed once\n")
        _print(f"fault injection: worker exits during epoch {epoch + 1}")
        os._exit(1)


def _quiet_reports(level: int) -> None:
    """Ray Train logs each ``ray.train.report`` as a whole ``TrainingReport(...)`` at INFO, under loggers named
    ``ray.train...`` and one named after its source file; the trainer's own lines already say what each epoch
    did."""
    import logging

    logging.getLogger("ray.train").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(level)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function; ``config`` holds the domain name, its config dict and the MLflow run."""
    import logging

    import ray.train
    import ray.train.torch
    from safetensors.torch import load as load_safetensors

    _quiet_reports(logging.WARNING)
    from shared.tracking import MlflowTracker

    domain = registry.get(config["domain"])
    cfg: Any = from_dict(domain.config_cls, config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    checkpoint = None
    if (saved := ray.train.get_checkpoint()) is not None:
        with saved.as_directory() as folder:
            checkpoint = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    init = config.get("init_weights")
    trainer = Trainer(
        domain, cfg, device=ray.train.torch.get_device(), rank=rank, world=world,
        tracker=MlflowTracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None,
        checkpoint=checkpoint, init_weights=load_safetensors(init) if init and checkpoint is None else None,
        prepare_model=lambda model, ddp: ray.train.torch.prepare_model(model, parallel_strategy="ddp" if ddp else None),
        prepare_loader=ray.train.torch.prepare_data_loader)
    while trainer.running:
        _maybe_fail(trainer.state.epoch)
        record = trainer.run_epoch()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(trainer.checkpoint(), Path(tmp) / CHECKPOINT_FILE)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(record), checkpoint=ckpt)
    ray.train.report(trainer.finalize(), checkpoint=None)


def fit(domain_name: str, cfg: Any, *, run_id: str, tracking_uri: str, storage_path: str,
        init_weights: bytes | None = None) -> None:
    """Run the trainer on the connected Ray cluster; rank 0 logs every result to the MLflow run ``run_id``.
    ``init_weights`` (safetensors bytes of a model of the same shape) replaces the fresh initialisation."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"domain": domain_name, "cfg": to_dict(cfg), "run_id": run_id,
                           "tracking_uri": tracking_uri, "init_weights": init_weights},
        scaling_config=ScalingConfig(num_workers=cfg.ray_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=f"{domain_name}-{run_id}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    print(f"trainer finished; last checkpoint {result.checkpoint.path if result.checkpoint else None}", flush=True)
