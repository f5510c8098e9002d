"""The one trainer every domain uses: Ray Train ``TorchTrainer`` with per-epoch checkpoints.

Domains supply data, a model and a loss (``shared.registry.Domain``); this module owns the loop: optimizer,
learning-rate schedule, early stopping on the validation metric, the choice of the weights to keep (the best
validation epoch's or the last's, ``cfg.keep``), checkpoints every epoch (a restarted worker
resumes from the last one), progress lines, and MLflow logging from rank 0 (per-epoch metrics, final test
metrics, plots and the model folder).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from shared import registry
from shared.config import from_dict, to_dict

FAIL_ONCE_ENV = "TESSERA_FAIL_ONCE_AT_EPOCH"  # fault injection for tests: "<epoch>:<marker file>"


def learning_rate(base: float, schedule: str, epoch: int, epochs: int) -> float:
    """lr for 0-based ``epoch``. 'halve' is the benchmark code's type1: two epochs at base, then halved."""
    if schedule == "halve":
        return base * 0.5 ** max(0, epoch - 1)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    return base


def kept_epoch(state: dict[str, Any], keep: str, metric: str) -> tuple[dict[str, torch.Tensor] | None, int, float]:
    """The weights to register after training, their 1-based epoch and validation ``metric``.

    ``keep="best"``: the best validation epoch's weights (a copy held in ``state``); ``"last"``: ``None``, the
    model as it stands after the last epoch (for domains whose validation metric is only a proxy, such as
    open-loop action error for a closed-loop policy).
    """
    history = state["history"]
    if not history:
        return None, 0, float("nan")
    if keep == "last":
        return None, int(history[-1]["epoch"]), float(history[-1][f"val_{metric}"])
    if keep != "best":
        raise ValueError(f"keep={keep!r}: expected 'best' or 'last'")
    epoch = next((int(r["epoch"]) for r in history if r[f"val_{metric}"] == state["best_val"]), 0)
    return state["best_model"], epoch, float(state["best_val"])


def _log(rank: int, message: str) -> None:
    # Straight to the process's stdout: Ray Train patches print() and, once MLflow wraps sys.stdout, each
    # printed line would reach the job log twice.
    if rank == 0:
        stream = sys.__stdout__ or sys.stdout
        stream.write(message + "\n")
        stream.flush()


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
        _log(0, f"fault injection: worker exits during epoch {epoch + 1}")
        os._exit(1)


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    """All-reduce (mean) of the gradients over the workers, for models DDP cannot wrap."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _loss_figure(history: list[dict[str, float]], metric: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(epochs, [h[f"val_{metric}"] for h in history], marker="o", label=f"val {metric}")
    ax.set_xlabel("epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function; ``config`` holds the domain name, its config dict and the MLflow run."""
    import ray.train
    import ray.train.torch
    from mlflow import MlflowClient

    from shared.tracking import load_weights, log_model, unwrap

    domain = registry.get(config["domain"])
    cfg: Any = from_dict(domain.config_cls, config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(getattr(cfg, "cpus_per_worker", 1))))
    torch.manual_seed(int(getattr(cfg, "seed", 0)))
    device = ray.train.torch.get_device()
    mlflow = MlflowClient(tracking_uri=config["tracking_uri"]) if rank == 0 else None
    run_id = config["run_id"]
    metric = domain.val_metric

    data = domain.load_data(cfg)
    model = domain.build_model(cfg, data.info)
    # Fused AdamW: one kernel for all parameters (CPU and CUDA): the optimizer step of iTransformer on CPU
    # goes from 3.8 to 1.6 ms.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=getattr(cfg, "weight_decay", 0.0),
                                  fused=device.type in ("cpu", "cuda"))
    state: dict[str, Any] = {"epoch": 0, "best_val": float("inf"), "best_model": None, "bad_epochs": 0,
                             "history": [], "stopped": False}
    keep = str(getattr(cfg, "keep", "best"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["trainer"]
        _log(rank, f"resumed from checkpoint after epoch {state['epoch']} (best val_{metric} {state['best_val']:.4f})")
    elif config.get("init_weights"):
        from safetensors.torch import load as load_safetensors

        load_weights(model, load_safetensors(config["init_weights"]))
        _log(rank, "started from the given weights")
    ddp = domain.supports_ddp(cfg)
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if ddp else None)
    pin = device.type == "cuda"
    train_loader = ray.train.torch.prepare_data_loader(
        DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True,  # type: ignore[arg-type]
                   drop_last=len(data.train) > cfg.batch_size, pin_memory=pin))
    val_loader: DataLoader[Any] = DataLoader(data.val, batch_size=cfg.batch_size * 2, pin_memory=pin)  # type: ignore[arg-type]
    test_loader: DataLoader[Any] = DataLoader(data.test, batch_size=cfg.batch_size * 2, pin_memory=pin)  # type: ignore[arg-type]
    precision = getattr(cfg, "precision", "auto")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    steps = len(train_loader) if not cfg.max_steps_per_epoch else min(len(train_loader), cfg.max_steps_per_epoch)
    _log(rank, f"{domain.name}/{getattr(cfg, 'model', '')}: {sum(p.numel() for p in model.parameters()):,} "
               f"parameters, {len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples, "
               f"{world} worker(s) on {device}{' with bf16 autocast' if use_bf16 else ''}")

    def evaluate(loader: DataLoader) -> dict[str, float]:
        bare = unwrap(model)
        bare.eval()
        with torch.inference_mode(), autocast:
            return domain.evaluate(bare, loader, device)

    while state["epoch"] < cfg.epochs and not state["stopped"]:
        epoch = state["epoch"]
        _maybe_fail(epoch)
        lr = learning_rate(cfg.lr, cfg.lr_schedule, epoch, cfg.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if world > 1 and hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        started, total, seen = time.perf_counter(), 0.0, 0
        report_every = max(1, steps // 5)
        for step, batch in enumerate(train_loader):
            if step >= steps:
                break
            with autocast:
                loss = domain.training_loss(model, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1 and not ddp:
                _average_gradients(model, world)
            optimizer.step()
            total += float(loss.detach())
            seen += cfg.batch_size * world
            if (step + 1) % report_every == 0 or step + 1 == steps:
                rate = seen / (time.perf_counter() - started)
                _log(rank, f"epoch {epoch + 1}/{cfg.epochs} [{'#' * ((step + 1) * 20 // steps):<20}] "
                           f"{step + 1}/{steps} loss {total / (step + 1):.4f} {rate:.0f} samples/s")
        elapsed = time.perf_counter() - started
        val = evaluate(val_loader)
        record = {"epoch": epoch + 1, "train_loss": total / max(1, steps), "lr": lr, "epoch_seconds": elapsed,
                  "samples_per_second": seen / elapsed, **{f"val_{k}": v for k, v in val.items()}}
        state["history"].append(record)
        if val[metric] < state["best_val"]:
            state["best_val"] = val[metric]
            if keep == "best":
                state["best_model"] = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if cfg.patience and state["bad_epochs"] >= cfg.patience:
            state["stopped"] = True
        _log(rank, f"epoch {epoch + 1}: train {record['train_loss']:.4f} "
                   + " ".join(f"val_{k} {v:.4f}" for k, v in val.items())
                   + f" lr {lr:.2e} {elapsed:.1f}s" + (" (early stop)" if state["stopped"] else ""))
        if mlflow is not None:
            for key, value in record.items():
                if key != "epoch":
                    mlflow.log_metric(run_id, key, float(value), step=epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "trainer": state}, Path(tmp) / "state.pt")
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in record.items()}, checkpoint=ckpt)

    # Final: the kept weights, test metrics, plots and the model folder (rank 0 only).
    weights, kept, kept_val = kept_epoch(state, keep, metric)
    if weights is not None:
        unwrap(model).load_state_dict(weights)
    _log(rank, f"keeping the weights of epoch {kept} ({keep}; val_{metric} {kept_val:.4f})")
    final: dict[str, Any] = {"epochs_run": state["epoch"], f"best_val_{metric}": state["best_val"],
                             "kept_epoch": kept, f"kept_val_{metric}": kept_val}
    if rank == 0 and mlflow is not None:
        bare = unwrap(model).to(device).eval()
        calibration = domain.calibrate(bare, val_loader, data.info, cfg, device)
        if calibration:  # the validation score as served, next to the kept epoch's raw one
            final.update(calibration)
            final.update({f"calibrated_val_{k}": v for k, v in evaluate(val_loader).items()})
            _log(rank, f"calibrated on validation: val_{metric} {kept_val:.4f} -> "
                       f"{final[f'calibrated_val_{metric}']:.4f}")
        test = evaluate(test_loader)
        final.update({f"test_{k}": v for k, v in test.items()})
        for key, value in final.items():
            mlflow.log_metric(run_id, key, float(value))
        figures = {"loss.png": _loss_figure(state["history"], metric)} if state["history"] else {}
        with torch.inference_mode():
            figures.update(domain.figures(bare, data, cfg))
        for name, fig in figures.items():
            mlflow.log_figure(run_id, fig, f"plots/{name}")
        log_model(mlflow, run_id, bare, domain.name, cfg, data.info)
        _log(rank, "test: " + " ".join(f"{k} {v:.4f}" for k, v in test.items()))
    ray.train.report(final, checkpoint=None)


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
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
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
