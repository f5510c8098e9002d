"""The one trainer every domain uses, as a plain class: no Ray in here (``pipelines.ray_train`` adapts it).

Domains supply data, a model and a loss (``shared.registry.Domain``); :class:`Trainer` owns the loop: AdamW
(no weight decay on norms and biases unless ``decay_1d``), linear warm-up then the per-epoch schedule,
gradient accumulation and clipping, early stopping on the validation metric, the choice of the weights to keep
(the best validation epoch's or the last's, ``cfg.keep``), a checkpoint of everything needed to resume, and
the final stage on rank 0: calibration, test metrics, plots and the model folder through a :class:`Tracker`.

Run it in a process of its own (``python -m pipelines.train DOMAIN --no-ray``, tests) or on every Ray Train
worker, which passes its rank, world size and the Ray wrappers for the model and the training loader.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from shared.layers import unwrap
from shared.registry import DataBundle, Domain
from shared.saved import SavedState
from shared.tracking import load_weights


class Tracker(Protocol):
    """Where rank 0 records a run (MLflow in production, memory in tests)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_figure(self, figure: Any, path: str) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_model(self, model: torch.nn.Module, domain: str, cfg: Any, state: SavedState) -> None: ...


class MemoryTracker:
    """A :class:`Tracker` that keeps everything in memory (tests, notebooks): metrics by name as (step, value)
    lists, figure paths, tags, and the logged model saved as a model folder under ``folder`` when given."""

    def __init__(self, folder: Path | None = None) -> None:
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.figures: list[str] = []
        self.tags: dict[str, str] = {}
        self.folder = folder
        self.model: tuple[str, Any, SavedState] | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_figure(self, figure: Any, path: str) -> None:
        import matplotlib.pyplot as plt

        self.figures.append(path)
        plt.close(figure)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    def log_model(self, model: torch.nn.Module, domain: str, cfg: Any, state: SavedState) -> None:
        self.model = (domain, cfg, state)
        if self.folder is not None:
            from shared.tracking import save_model_dir

            save_model_dir(self.folder, model, domain, cfg, state)


def learning_rate(base: float, schedule: str, epoch: int, epochs: int) -> float:
    """lr for 0-based ``epoch``. 'halve' is the benchmark code's type1: two epochs at base, then halved."""
    if schedule == "halve":
        return base * 0.5 ** max(0, epoch - 1)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    return base


def param_groups(model: torch.nn.Module, weight_decay: float, decay_1d: bool) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices and kernels; none on parameters with fewer than two
    dimensions (norm gains, biases, scalars) unless ``decay_1d`` (nanoGPT's rule).

    A parameter that carries an ``optim_group`` attribute (a dict: ``lr_scale``, ``weight_decay``) gets a group
    of its own: its learning rate follows the schedule times ``lr_scale`` (EBT's learned step size)."""
    params = [p for p in model.parameters() if p.requires_grad]
    special = [p for p in params if getattr(p, "optim_group", None)]
    params = [p for p in params if not getattr(p, "optim_group", None)]
    own = [{"params": [p], "lr_scale": float(p.optim_group.get("lr_scale", 1.0)),  # type: ignore[attr-defined]
            "weight_decay": float(p.optim_group.get("weight_decay", weight_decay))}  # type: ignore[attr-defined]
           for p in special]
    if decay_1d or weight_decay == 0:
        return [{"params": params, "weight_decay": weight_decay}, *own]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}, *own]


def shard(dataset: Any, rank: int, world: int) -> Any:
    """Every ``world``-th sample from ``rank`` on (no padding, so metrics summed over ranks count each sample
    once); the whole dataset when ``world == 1``."""
    return dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))


@dataclass
class TrainState:
    """Everything about the run's progress that a resumed worker needs (saved in every checkpoint)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (warm-up counts them)
    best_val: float = math.inf
    best_epoch: int = 0
    best_model: dict[str, torch.Tensor] | None = None  # the best epoch's weights (keep="best")
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # no deep copy of the weights

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainState:
        return cls(**saved)


def kept_epoch(state: TrainState, keep: str, metric: str) -> tuple[dict[str, torch.Tensor] | None, int, float]:
    """The weights to register after training, their 1-based epoch and validation ``metric``.

    ``keep="best"``: the best validation epoch's weights (a copy held in ``state``); ``"last"``: ``None``, the
    model as it stands after the last epoch (for domains whose validation metric is only a proxy, such as
    open-loop action error for a closed-loop policy).
    """
    if not state.history:
        return None, 0, float("nan")
    if keep == "last":
        return None, int(state.history[-1]["epoch"]), float(state.history[-1][f"val_{metric}"])
    if keep != "best":
        raise ValueError(f"keep={keep!r}: expected 'best' or 'last'")
    return state.best_model, state.best_epoch, float(state.best_val)


def _print(message: str) -> None:
    # Straight to the process's stdout: Ray Train patches print() and, once MLflow wraps sys.stdout, each
    # printed line would reach the job log twice.
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


def _identity(module: torch.nn.Module, ddp: bool) -> torch.nn.Module:
    return module


def _same_loader(loader: DataLoader) -> DataLoader:
    return loader


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


class Trainer:
    """Trains ``domain``'s model for ``cfg`` (a :class:`shared.config.RunSettings` subclass).

    ``checkpoint`` (from :meth:`checkpoint`) resumes a run; ``init_weights`` replaces the fresh initialisation
    (``--init-from``). ``prepare_model(module, ddp)`` and ``prepare_loader(loader)`` wrap the model and the
    training loader for distributed training (Ray Train's ``prepare_model`` / ``prepare_data_loader``); the
    default is one process. ``tracker`` is given on rank 0 only. A new run (neither) first trains the domain's
    pretraining run when it asks for one (:meth:`Domain.pretraining`; ``pretrain=False``: not).
    """

    def __init__(self, domain: Domain, cfg: Any, *, device: torch.device | None = None, rank: int = 0,
                 world: int = 1, tracker: Tracker | None = None, log: Callable[[str], None] | None = _print,
                 checkpoint: Mapping[str, Any] | None = None, init_weights: Mapping[str, torch.Tensor] | None = None,
                 prepare_model: Callable[[torch.nn.Module, bool], torch.nn.Module] = _identity,
                 prepare_loader: Callable[[DataLoader], DataLoader] = _same_loader,
                 data: DataBundle | None = None, pretrain: bool = True) -> None:
        self.domain, self.cfg = domain, cfg
        self.device = device or torch.device("cpu")
        self.rank, self.world = rank, world
        self.tracker = tracker if rank == 0 else None
        self._log = log if rank == 0 else None
        self.metric = domain.val_metric
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        torch.manual_seed(int(cfg.seed))

        self.data = data or domain.load_data(cfg)
        self.pretrained: dict[str, Any] | None = None  # what the domain's pretraining run gave (None: none ran)
        start_weights = self._pretrain() if pretrain and checkpoint is None and init_weights is None else None
        if start_weights is not None:
            torch.manual_seed(int(cfg.seed))  # this run's initialisation, shuffling and dropout as without it
        model = domain.build_model(cfg, self.data.state).to(self.device)
        # Fused AdamW: one kernel for all parameters (CPU and CUDA): the optimizer step of iTransformer on CPU
        # goes from 3.8 to 1.6 ms.
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_1d), lr=cfg.lr,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.state = TrainState()
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.state = TrainState.from_dict(checkpoint["trainer"])
            if "rng" in checkpoint:  # the shuffling and dropout go on as if the run had not stopped
                torch.set_rng_state(checkpoint["rng"])
                if self.device.type == "cuda" and "cuda_rng" in checkpoint:
                    torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.device)
            self.log(f"resumed from checkpoint after epoch {self.state.epoch} "
                     f"(best val_{self.metric} {self.state.best_val:.4f})")
        elif init_weights is not None:
            load_weights(model, dict(init_weights))
            self.log("started from the given weights")
        elif start_weights is not None:
            load_weights(model, start_weights)
        # The moving average of the weights (ema_decay > 0): a frozen copy that validation, the kept epoch and the
        # registered model use; resumed from the checkpoint's when there is one.
        self.ema: torch.nn.Module | None = None
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        if cfg.ema_decay:
            self.ema = copy.deepcopy(model).requires_grad_(False)
            if checkpoint is not None and "ema" in checkpoint:
                self.ema.load_state_dict(checkpoint["ema"])
        self.ddp = domain.supports_ddp(cfg)
        self.model = prepare_model(model, self.ddp)
        pin = self.device.type == "cuda"
        micro = cfg.micro_batch
        workers = {"num_workers": cfg.loader_workers, "persistent_workers": cfg.loader_workers > 0,
                   "collate_fn": domain.collate(cfg)}
        train: Dataset[Any] = self.data.train  # type: ignore[assignment]
        self.train_loader = prepare_loader(DataLoader(train, batch_size=micro, shuffle=True,
                                                      drop_last=len(self.data.train) > micro, pin_memory=pin,
                                                      **workers))
        self._eval_loader_args = {"batch_size": cfg.batch_size * 2, "pin_memory": pin, **workers}
        self.val_loader = self._eval_loader(self.data.val, sharded=True)
        precision = cfg.precision
        self.use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        batches = len(self.train_loader)
        self.steps_per_epoch = math.ceil(batches / cfg.grad_accum)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        n_params = sum(p.numel() for p in model.parameters())
        self.log(f"{domain.name}/{getattr(cfg, 'model', '')}: {n_params:,} parameters, {len(self.data.train)} train / "
                 f"{len(self.data.val)} val / {len(self.data.test)} test samples, {world} worker(s) on "
                 f"{self.device}{' with bf16 autocast' if self.use_bf16 else ''}; batch {cfg.batch_size} = "
                 f"{world} worker(s) x {cfg.grad_accum} step(s) x {micro}")

    # --- helpers ---------------------------------------------------------------------------------------------

    def _pretrain(self) -> dict[str, torch.Tensor] | None:
        """The domain's run before this one (:meth:`Domain.pretraining`), if it asks for one: trained here,
        untracked, on every rank alike (it is seeded). Returns its network's weights (None: no such run) and
        keeps what to log of it in ``pretrained``."""
        pre_cfg = self.domain.pretraining(self.cfg, self.data.state)
        if pre_cfg is None:
            return None
        start = time.perf_counter()
        outer = self._log
        pre = Trainer(self.domain, pre_cfg, device=self.device, rank=self.rank, world=1, pretrain=False,
                      log=(lambda m: outer(f"pretraining: {m}")) if outer is not None else None)
        final = pre.fit()
        summary = {"pretrain_seconds": time.perf_counter() - start, "pretrain_epochs": float(final["epochs_run"]),
                   f"pretrain_val_{self.metric}": float(final[f"kept_val_{self.metric}"])}
        self.log("started from the pretraining run's network: " + " ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        if self.tracker is not None:
            self.tracker.log_metrics(summary)
        self.pretrained = summary
        return {k: v.detach().clone() for k, v in pre.bare.state_dict().items()}

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _eval_loader(self, dataset: Any, sharded: bool) -> DataLoader:
        return DataLoader(shard(dataset, self.rank, self.world) if sharded else dataset, **self._eval_loader_args)

    @property
    def bare(self) -> torch.nn.Module:
        return unwrap(self.model)

    @property
    def scored(self) -> torch.nn.Module:
        """The weights validation scores and training keeps: the moving average when there is one."""
        return self.ema if self.ema is not None else self.bare

    @property
    def running(self) -> bool:
        return self.state.epoch < self.cfg.epochs and not self.state.stopped

    def evaluate(self, loader: DataLoader, *, reduce: bool = True) -> dict[str, float]:
        """The domain's metrics over ``loader``; with ``reduce`` and several workers, each worker scores its own
        shard and the additive sums are combined across workers."""
        bare = self.scored
        bare.eval()
        batches = itertools.islice(loader, self.cfg.max_eval_batches) if self.cfg.max_eval_batches else loader
        with torch.inference_mode(), self.autocast():
            sums = self.domain.metric_sums(bare, batches, self.device)
        if reduce and self.world > 1:
            import torch.distributed as dist

            gathered: list[dict[str, float] | None] = [None] * self.world
            dist.all_gather_object(gathered, sums)
            sums = {}
            for part in gathered:
                for key, value in (part or {}).items():
                    sums[key] = sums.get(key, 0.0) + value
        return self.domain.metrics_from(sums)

    def checkpoint(self) -> dict[str, Any]:
        """Model, optimizer, progress and random state: what :class:`Trainer` takes back as ``checkpoint`` to
        resume exactly where this run is (torch.save / ``weights_only`` load safe)."""
        saved = {"model": self.bare.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "trainer": self.state.to_dict(), "rng": torch.get_rng_state()}
        if self.ema is not None:
            saved["ema"] = self.ema.state_dict()
        if self.device.type == "cuda":
            saved["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return saved

    # --- one epoch -------------------------------------------------------------------------------------------

    def _average_gradients(self) -> None:
        """All-reduce (mean) of the gradients over the workers, for models DDP cannot wrap."""
        import torch.distributed as dist

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _groups(self) -> Iterator[list[Any]]:
        """The epoch's micro-batches, ``grad_accum`` at a time (the last group may be shorter)."""
        group: list[Any] = []
        for batch in self.train_loader:
            group.append(batch)
            if len(group) == self.cfg.grad_accum:
                yield group
                group = []
        if group:
            yield group

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights, with the usual warm-up of the decay (the first steps
        average over fewer of them); buffers (norm statistics, temperatures) are copied."""
        assert self.ema is not None
        if self._ema_pairs is None:
            self._ema_pairs = ([p.data for p in self.ema.parameters()], [p.data for p in self.bare.parameters()])
        step = self.state.step
        power = float(self.cfg.ema_power)
        warm = 1.0 - (1 + step) ** -power if power > 0 else (1 + step) / (10 + step)
        decay = min(float(self.cfg.ema_decay), warm)
        torch._foreach_lerp_(self._ema_pairs[0], self._ema_pairs[1], 1.0 - decay)
        for mine, theirs in zip(self.ema.buffers(), self.bare.buffers(), strict=True):
            mine.copy_(theirs)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training data; returns the epoch's train loss, lr, time and throughput."""
        cfg, epoch, steps = self.cfg, self.state.epoch, self.steps_per_epoch
        lr = learning_rate(cfg.lr, cfg.lr_schedule, epoch, cfg.epochs)
        self._set_lr(lr)
        sampler = getattr(self.train_loader, "sampler", None)
        if self.world > 1 and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        self.model.train()
        started, seen = time.perf_counter(), 0
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # read as a number only when logged
        report_every = max(1, steps // 5)
        for step, group in enumerate(itertools.islice(self._groups(), steps)):
            if cfg.warmup_steps and self.state.step < cfg.warmup_steps:
                self._set_lr(lr * (self.state.step + 1) / cfg.warmup_steps)
            elif cfg.warmup_steps and self.state.step == cfg.warmup_steps:
                self._set_lr(lr)
            self.optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(group):
                last = i == len(group) - 1
                no_sync = getattr(self.model, "no_sync", None)  # DDP: all-reduce on the group's last backward only
                sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
                with sync:
                    with self.autocast():
                        loss = self.domain.training_loss(self.model, batch, self.device)
                    (loss / len(group) if len(group) > 1 else loss).backward()
                total += loss.detach().double() / len(group)
            if self.world > 1 and not self.ddp:
                self._average_gradients()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.state.step += 1
            if self.ema is not None:
                self._update_ema()
            seen += cfg.batch_size
            if (step + 1) % report_every == 0 or step + 1 == steps:
                rate = seen / (time.perf_counter() - started)
                speed = f"{rate:.0f} samples/s" if rate >= 10 else f"{1 / rate:.2f} s/sample" if rate < 1 \
                    else f"{rate:.1f} samples/s"  # 3-D patches take seconds each: "0 samples/s" said nothing
                self.log(f"epoch {epoch + 1}/{cfg.epochs} [{'#' * ((step + 1) * 20 // steps):<20}] "
                         f"{step + 1}/{steps} loss {float(total) / (step + 1):.4f} {speed}")
        elapsed = time.perf_counter() - started
        return {"epoch": epoch + 1, "train_loss": float(total) / max(1, steps), "lr": lr, "epoch_seconds": elapsed,
                "samples_per_second": seen / elapsed}

    def end_epoch(self, record: dict[str, float], val: Mapping[str, float]) -> dict[str, float]:
        """Book an epoch's validation: history, the best epoch (and its weights), early stopping, logging."""
        record = {**record, **{f"val_{k}": v for k, v in val.items()}}
        state = self.state
        state.history.append(record)
        if val[self.metric] < state.best_val:
            state.best_val, state.best_epoch = val[self.metric], int(record["epoch"])
            if self.cfg.keep == "best":
                state.best_model = {k: v.detach().cpu().clone() for k, v in self.scored.state_dict().items()}
            state.bad_epochs = 0
        else:
            state.bad_epochs += 1
        state.epoch = int(record["epoch"])
        if self.cfg.patience and state.bad_epochs >= self.cfg.patience:
            state.stopped = True
        self.log(f"epoch {state.epoch}: train {record['train_loss']:.4f} "
                 + " ".join(f"val_{k} {v:.4f}" for k, v in val.items())
                 + f" lr {record['lr']:.2e} {record['epoch_seconds']:.1f}s"
                 + (" (early stop)" if state.stopped else ""))
        if self.tracker is not None:
            self.tracker.log_metrics({k: float(v) for k, v in record.items() if k != "epoch"}, step=state.epoch)
        return record

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, validate (sharded over the workers) and book it; returns the epoch's record."""
        record = self.train_epoch()
        return self.end_epoch(record, self.evaluate(self.val_loader))

    # --- the end of the run ----------------------------------------------------------------------------------

    def finalize(self) -> dict[str, Any]:
        """Load the kept weights; on rank 0 calibrate on validation, score the test split, log the metrics,
        plots and model folder. Returns the final figures (``kept_epoch``, ``test_...``, ...)."""
        weights, kept, kept_val = kept_epoch(self.state, self.cfg.keep, self.metric)
        if weights is None and self.ema is not None:
            weights = self.ema.state_dict()
        if weights is not None:
            self.bare.load_state_dict(weights)
        self.ema = None  # from here on the kept weights are the model's own
        self.log(f"keeping the weights of epoch {kept} ({self.cfg.keep}"
                 f"{', moving average' if self.cfg.ema_decay else ''}; val_{self.metric} {kept_val:.4f})")
        final: dict[str, Any] = {"epochs_run": self.state.epoch, f"best_val_{self.metric}": self.state.best_val,
                                 "kept_epoch": kept, f"kept_val_{self.metric}": kept_val}
        if self.rank != 0:
            return final
        bare = self.bare.to(self.device).eval()
        val_loader = self._eval_loader(self.data.val, sharded=False)
        state = self.data.state
        calibration = self.domain.calibrate(bare, val_loader, state, self.cfg, self.device)
        if calibration is not None:  # the validation score as served, next to the kept epoch's raw one
            state = calibration.state
            final.update(calibration.metrics)
            final.update({f"calibrated_val_{k}": v for k, v in self.evaluate(val_loader, reduce=False).items()})
            self.log(f"calibrated on validation: val_{self.metric} {kept_val:.4f} -> "
                     f"{final[f'calibrated_val_{self.metric}']:.4f}")
        test = self.evaluate(self._eval_loader(self.data.test, sharded=False), reduce=False)
        final.update({f"test_{k}": v for k, v in test.items()})
        self.final_state = state
        if self.tracker is not None:
            self.tracker.log_metrics({k: float(v) for k, v in final.items()})
            figures = {"loss.png": _loss_figure(self.state.history, self.metric)} if self.state.history else {}
            with torch.inference_mode():
                figures.update(self.domain.figures(bare, DataBundle(self.data.train, self.data.val, self.data.test,
                                                                    state), self.cfg))
            for name, fig in figures.items():
                self.tracker.log_figure(fig, f"plots/{name}")
            self.tracker.log_model(bare, self.domain.name, self.cfg, state)
            self.tracker.set_tags({"eval_signature": self.domain.eval_signature(self.cfg, state)})
        self.log("test: " + " ".join(f"{k} {v:.4f}" for k, v in test.items()))
        return final

    def fit(self) -> dict[str, Any]:
        """Every remaining epoch, then :meth:`finalize` (the loop of a single process)."""
        while self.running:
            self.run_epoch()
        return self.finalize()
