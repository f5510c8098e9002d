"""Benchmark: training throughput of the forecasting models (forward + backward + optimizer step).

    python -m pipelines.benchmarks.train_throughput [--data PATH.csv] [--model itransformer] [--steps 60]

Uses the published ETTh1 settings (batch 32, lookback 96, horizon 96) on ETTh1 when ``--data`` (or
../shared/data/forecasting/ETTh1.csv) exists, else on the synthetic series with 7 variables. Two variants of the
same model are timed in the same run and their ratio printed:
- iTransformer: ``shared.attention``'s automatic backend (SDPA's fused kernel on CPU) against its explicit
  reference path (a naive softmax(QKᵀ)V);
- Autoformer: bf16 autocast (``--set precision=bf16``) against its default on CPU, plain fp32 as in the paper
  (its own Auto-Correlation op is benchmarked against a reference-style implementation by
  ``pipelines.benchmarks.autoformer_step``).
The reference implementations' figures measured on this kind of machine (27.0 ms/step iTransformer, ~2000
ms/step Autoformer) are printed for context only: they were not measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from shared import registry

ANCHOR_MS = {"itransformer": 27.0, "autoformer": 2000.0}  # ANCHORS.md, reference code on a 2-core CPU
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "forecasting" / "ETTh1.csv"


def time_steps(model_name: str, data: str | None, steps: int, backend: str, threads: int,
               precision: str | None = None) -> dict[str, float]:
    os.environ["TESSERA_ATTENTION_BACKEND"] = backend
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    domain = registry.get("forecasting")
    cfg = domain.make_config(model_name, data, {"precision": precision} if precision else {})
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    bundle = domain.load_data(cfg)
    model = domain.build_model(cfg, bundle.state).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)  # as the trainer
    loader: DataLoader[Any] = DataLoader(bundle.train, batch_size=cfg.batch_size,  # type: ignore[arg-type]
                                         shuffle=True, drop_last=True)
    device = torch.device("cpu")
    durations: list[float] = []
    batches = iter(loader)
    for step in range(steps + 5):  # 5 warm-up steps
        batch = next(batches)
        started = time.perf_counter()
        with autocast:
            loss = domain.training_loss(model, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 5:
            durations.append(time.perf_counter() - started)
    median = statistics.median(durations)
    return {"ms_per_step": median * 1e3, "min_ms_per_step": min(durations) * 1e3,
            "samples_per_s": cfg.batch_size / median, "steps_per_epoch": len(loader),
            "epoch_s": median * len(loader)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None)
    parser.add_argument("--model", default="itransformer", choices=registry.get("forecasting").models)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants: dict[str, tuple[str, str | None]]
    if args.model == "itransformer":
        variants = {"shared.attention auto": ("auto", None), "naive reference path": ("reference", None)}
        default_label = "shared.attention auto"  # what a plain `tessera train` runs on CPU
    else:
        variants = {"bf16 autocast": ("auto", "bf16"), "fp32 (default on CPU)": ("auto", "fp32")}
        default_label = "fp32 (default on CPU)"
    results = {label: time_steps(args.model, args.data, args.steps, backend, args.threads, precision)
               for label, (backend, precision) in variants.items()}
    fast, base = results.values()
    print(f"{args.model} training step on {Path(args.data).name if args.data else 'synthetic data'}, batch 32, "
          f"96->96, {args.threads} threads, median of {args.steps} steps")
    print(f"{'variant':<26}{'ms/step':>10}{'samples/s':>12}{'s/epoch':>10}")
    for label, r in results.items():
        print(f"{label:<26}{r['ms_per_step']:>10.1f}{r['samples_per_s']:>12.0f}{r['epoch_s']:>10.1f}")
    print(f"speed-up of {list(results)[0]!r} over {list(results)[1]!r} in this run: "
          f"{base['ms_per_step'] / fast['ms_per_step']:.2f}x")
    default = results[default_label]
    print(f"for context (not this run): the reference implementation measured {ANCHOR_MS[args.model]:.0f} ms/step "
          f"on this kind of machine -> {ANCHOR_MS[args.model] / default['ms_per_step']:.2f}x for the default")
    if args.json:
        print(json.dumps({"model": args.model, "results": results,
                          "speedup": base["ms_per_step"] / fast["ms_per_step"]}))


if __name__ == "__main__":
    main()
