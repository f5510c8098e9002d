"""Benchmark: ``shared.attention.attention`` (auto backend) against a naive ``softmax(Q Kᵀ · scale) V``.

    python -m pipelines.benchmarks.attention [--batch 8 --heads 8 --length 2048 --dim 64 --repeats 5] [--json]

Each variant runs in a fresh subprocess so that one cannot inherit the other's allocator state. In it: the
inputs are allocated (same seed for both) and a tiny problem warms the kernels up; then the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs``) and the current RSS taken as the baseline; one full-size call
follows and its *extra* peak memory is peak RSS (VmHWM) minus that baseline. Where the counter cannot be reset
(not Linux), ``ru_maxrss`` is used instead, which can only over-state the extra memory. Timing is the median of
``--repeats`` further calls (the minimum is shown too: on a shared machine it is the least disturbed), forward
only, under ``torch.no_grad``. The outputs are compared (max abs diff); the command exits 1 when they differ
by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"tessera": "shared.attention (auto)", "naive": "naive softmax(QK^T)V"}
MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _child(args: argparse.Namespace) -> None:
    """Run one variant and print one JSON line; the output tensor goes to ``args.out``."""
    import torch

    from shared.attention import attention, select_backend

    def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, L, L)
        return torch.softmax(scores, dim=-1) @ v  # (B, H, L, D)

    def tessera(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v)

    fn = tessera if args.child == "tessera" else naive
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    backend = select_backend(q, k, v) if args.child == "tessera" else "naive"
    with torch.no_grad():
        tiny = [t[:1, :1, :16] for t in (q, k, v)]
        fn(*tiny)
        exact_peak = _reset_peak_rss()
        baseline_kib = _status_kib("VmRSS") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn(q, k, v)
        peak_kib = _status_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.save(out, args.out)
        del out
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(q, k, v)
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "variant": args.child, "backend": backend, "threads": torch.get_num_threads(), "times_s": times,
        "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
        "extra_peak_mib": ((peak_kib or 0) - (baseline_kib or 0)) / 1024,
        "baseline_rss_mib": (baseline_kib or 0) / 1024, "peak_method": "VmHWM" if exact_peak else "ru_maxrss",
    }))


def _run_variant(variant: str, args: argparse.Namespace, out_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipelines.benchmarks.attention", "--child", variant, "--out", str(out_path),
           "--batch", str(args.batch), "--heads", str(args.heads), "--length", str(args.length),
           "--dim", str(args.dim), "--repeats", str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} benchmark failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed max abs difference of outputs")
    parser.add_argument("--json", action="store_true", help="print one JSON line with all results at the end")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "heads", "length", "dim", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        _child(args)
        return 0
    import torch

    with tempfile.TemporaryDirectory(prefix="tessera-attn-bench-") as tmp:
        results = {name: _run_variant(name, args, Path(tmp) / f"{name}.pt") for name in VARIANTS}
        outs = {name: torch.load(Path(tmp) / f"{name}.pt", weights_only=True) for name in VARIANTS}
    max_diff = float((outs["tessera"] - outs["naive"]).abs().max())
    ok = max_diff <= args.atol
    fast, slow = results["tessera"], results["naive"]
    speedup = slow["median_ms"] / fast["median_ms"]
    memory_ratio = slow["extra_peak_mib"] / max(fast["extra_peak_mib"], 1e-9)

    print(f"attention benchmark: B={args.batch} H={args.heads} L={args.length} D={args.dim} float32 on CPU, "
          f"{fast['threads']} threads, median of {args.repeats} calls, each variant in a fresh process")
    print(f"{'variant':<26} {'backend':<8} {'median ms':>10} {'min ms':>9} {'extra peak MiB':>15}")
    for name, label in VARIANTS.items():
        r = results[name]
        print(f"{label:<26} {r['backend']:<8} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['extra_peak_mib']:>15.1f}")
    print(f"speed-up {speedup:.2f}x; extra peak memory {memory_ratio:.1f}x smaller; "
          f"max |diff| {max_diff:.2e} ({'ok' if ok else f'FAIL: above {args.atol:g}'}); peak via {fast['peak_method']}")
    if args.json:
        print(json.dumps({"batch": args.batch, "heads": args.heads, "length": args.length, "dim": args.dim,
                          "repeats": args.repeats, "results": results, "speedup": speedup,
                          "memory_ratio": memory_ratio, "max_abs_diff": max_diff, "outputs_match": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
