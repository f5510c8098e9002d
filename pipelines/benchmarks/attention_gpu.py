"""Benchmark (CUDA): TFLOP/s of ``shared.attention`` beside SDPA's own flash kernel, in one process, alternately.

    python -m pipelines.benchmarks.attention_gpu [--batch 8 --heads 16 --length 4096 --dim 128 --repeats 20] [--json]

For bf16 inputs (B, H, L, D), causal and not, forward and forward + backward: ``shared.attention`` with its
automatic backend (flash-attn when installed and able, else SDPA), and ``F.scaled_dot_product_attention``
restricted to its FLASH_ATTENTION kernel. Each timing is the median over ``--repeats`` of CUDA-event times, the
variants taking turns, after warm-up calls. FLOPs are counted as flash-attn's benchmarks count them: 4·B·H·L²·D
for the forward (halved when causal), 2.5 times that for the backward. Exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any


def _flops(batch: int, heads: int, length: int, dim: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * batch * heads * length * length * dim / (2.0 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from shared.attention import attention, available_backends, select_backend

    if not torch.cuda.is_available():
        print("attention_gpu: no CUDA GPU here", file=sys.stderr)
        return 2
    shape = (args.batch, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    def tessera(causal: bool) -> Any:
        return attention(q, k, v, causal=causal)

    def sdpa_flash(causal: bool) -> Any:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    variants: dict[str, Callable[[bool], Any]] = {"shared.attention": tessera, "sdpa flash kernel": sdpa_flash}
    rows = []
    for causal in (False, True):
        for backward in (False, True):
            def step(fn: Callable[[bool], Any], causal: bool = causal, backward: bool = backward) -> None:
                if backward:
                    fn(causal).backward(grad)
                else:
                    with torch.no_grad():
                        fn(causal)

            times: dict[str, list[float]] = {name: [] for name in variants}
            for fn in variants.values():  # warm-up
                for _ in range(3):
                    step(fn)
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step(fn)
                    end.record()
                    torch.cuda.synchronize()
                    times[name].append(start.elapsed_time(end) / 1e3)
            flops = _flops(*shape, causal=causal, backward=backward)
            for name in variants:
                seconds = statistics.median(times[name])
                rows.append({"variant": name, "causal": causal, "pass": "fwd+bwd" if backward else "fwd",
                             "ms": round(seconds * 1e3, 3), "tflops": round(flops / seconds / 1e12, 1)})
    backend = select_backend(q, k, v)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backends {available_backends()}, "
          f"shared.attention chose {backend}; B={args.batch} H={args.heads} L={args.length} D={args.dim} bf16")
    print(f"{'variant':<20} {'causal':<7} {'pass':<8} {'ms':>9} {'TFLOP/s':>8}")
    for row in rows:
        print(f"{row['variant']:<20} {row['causal']!s:<7} {row['pass']:<8} {row['ms']:>9.3f} {row['tflops']:>8.1f}")
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "backend": backend, "shape": shape, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
