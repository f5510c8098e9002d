"""Benchmark: ``shared.attention``'s "small" CPU backend against SDPA on short sequences.

    python -m pipelines.benchmarks.attention_small [--threads 2] [--repeats 60] [--lengths 11 16 32 64 128 256]

For each shape (batch 32 x 8 heads of head dim 32 at 11 tokens, iTransformer's ETTh1 setting with 7 variate
and 4 calendar tokens; then fewer sequences as they get longer, about the same number of tokens) and each phase
(inference: a forward under ``torch.inference_mode``; training: forward and backward of a weighted sum of the
output, without and with dropout 0.1 on the weights), the two backends are timed alternately and the ratio is
the median of the paired ratios (small / sdpa: below 1 is faster). Before timing, the two are checked to compute
the same function (forward and gradients, without dropout). The last line is a JSON object.

``SMALL_AUTO_MAX_KEYS`` in ``shared.attention`` (inference chooses "small" by itself up to that many keys) and
the forecasting fast path's ``SMALL_TRAIN_MAX_KEYS`` (training asks for it up to that many) come from this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from shared.attention import attention


def shapes(lengths: list[int]) -> list[tuple[int, int, int, int]]:
    """(batch, heads, length, head dim): 32 x 8 heads at 11 tokens, about as many tokens for longer ones."""
    return [(max(1, (32 * 11) // n) if n > 11 else 32, 8, n, 32) for n in lengths]


def timed_pair(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def bench_shape(shape: tuple[int, int, int, int], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    weight = torch.randn(b, h, n, d, generator=gen)  # the upstream gradient of a weighted sum
    leaves = {name: [t.clone().requires_grad_(True) for t in (q, k, v)] for name in ("small", "sdpa")}

    # the same function: forward and gradients without dropout
    outs = {name: attention(*ts, backend=name) for name, ts in leaves.items()}
    grads = {name: torch.autograd.grad((out * weight).sum(), leaves[name]) for name, out in outs.items()}
    diff = max([(outs["small"] - outs["sdpa"]).abs().max().item()]
               + [(a - c).abs().max().item() for a, c in zip(grads["small"], grads["sdpa"], strict=True)])

    def infer(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                attention(q, k, v, backend=name)
        return run

    def train(name: str, p: float) -> Callable[[], None]:
        ts = leaves[name]

        def run() -> None:
            out = attention(*ts, dropout_p=p, backend=name)
            torch.autograd.grad((out * weight).sum(), ts)
        return run

    phases = {"inference": {n_: infer(n_) for n_ in ("small", "sdpa")},
              "train": {n_: train(n_, 0.0) for n_ in ("small", "sdpa")},
              "train_dropout": {n_: train(n_, 0.1) for n_ in ("small", "sdpa")}}
    result: dict[str, dict[str, float]] = {}
    for phase, fns in phases.items():
        times = timed_pair(fns, warmup, repeats)
        ratio = statistics.median(s / t for s, t in zip(times["small"], times["sdpa"], strict=True))
        result[phase] = {"small_ms": 1e3 * statistics.median(times["small"]),
                         "sdpa_ms": 1e3 * statistics.median(times["sdpa"]), "ratio": ratio}
    result["check"] = {"max_abs_diff": diff}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[11, 16, 32, 64, 128, 256])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"shared.attention 'small' against SDPA on the CPU, {args.threads} thread(s), fp32; "
          f"ratio = small / sdpa (median of paired runs)")
    print(f"{'shape (B, H, L, D)':<22}{'phase':<15}{'small ms':>10}{'sdpa ms':>10}{'ratio':>8}")
    results = {}
    for shape in shapes(args.lengths):
        found = bench_shape(shape, args.warmup, args.repeats)
        if found["check"]["max_abs_diff"] > 1e-4:
            raise SystemExit(f"{shape}: the backends differ by {found['check']['max_abs_diff']:.2e}")
        for phase in ("inference", "train", "train_dropout"):
            r = found[phase]
            print(f"{str(shape):<22}{phase:<15}{r['small_ms']:>10.3f}{r['sdpa_ms']:>10.3f}{r['ratio']:>7.2f}x")
        results["x".join(map(str, shape))] = found
    print(json.dumps({"benchmark": "attention_small", "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
