"""Benchmark: packed light-curve batches against batches padded to their longest curve, and serving speed.

    python -m pipelines.benchmarks.transients [--data ../shared/data/transients/ztf_bts_lightcurves.csv]
        [--steps 30] [--batch 64] [--url http://127.0.0.1:3003] [--requests 300] [--concurrency 16]

On the real length distribution (the ZTF BTS file when given or found, else synthetic curves), in one run:

1. training throughput of the ``native`` model (forward, backward, AdamW step on shuffled batches): packed
   (``packing=pack``: no padding anywhere, attention per group of similar length) vs padded to the longest curve
   of each batch (``packing=pad``), the same weights and batches;
2. the attention call alone on those batches (forward + backward): ``varlen_attention`` on packed tokens vs
   ``attention`` on the padded batch with a key-padding mask;
3. serving in-process: latency of one light curve, and light curves/s in batches of 64;
4. with ``--url`` (a running service with a model): ``POST /classify`` one object per request, one at a time and
   with ``--concurrency`` in flight (BentoML batches across requests), requests/s and p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared import registry
from shared.attention import attention, varlen_attention

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "transients" / "ztf_bts_lightcurves.csv"


def _curves(data: str | None) -> tuple[list[Any], str]:
    from services.transients.config import TransientsConfig
    from services.transients.data import load_labelled, synthetic_curves

    if data:
        return load_labelled(data, None, TransientsConfig(data=data)).curves, Path(data).name
    curves, _, _ = synthetic_curves(2000, seed=0)
    return curves, "synthetic"


def _batches(curves: list[Any], batch: int, steps: int, seed: int) -> list[list[dict[str, Any]]]:
    from services.transients.data import tokens

    rng = np.random.default_rng(seed)
    items = [{**tokens(c, use_redshift=False), "label": 0} for c in curves]
    order = rng.permutation(len(items))
    return [[items[i] for i in order[(s * batch) % len(items):][:batch]] for s in range(steps)]


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def _native_model() -> tuple[torch.nn.Module, Any, Any]:
    """The default ``native`` model (fresh weights, seed 0) for five classes of ZTF g/r light curves."""
    from services.transients.data import TransientsState

    domain = registry.get("transients")
    cfg = domain.make_config("native", None, {})
    state = TransientsState(data="bench", fingerprint="", classes=("a", "b", "c", "d", "e"), survey="ztf",
                            bands=("g", "r"), wavelengths=(4746.48, 6366.38), objects={}, class_counts=(1,) * 5)
    torch.manual_seed(0)
    return domain.build_model(cfg, state), cfg, state


def train_throughput(curves: list[Any], batch: int, steps: int) -> dict[str, float]:
    from services.transients.data import collate_packed, collate_padded

    model = _native_model()[0].train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    groups = _batches(curves, batch, steps, seed=0)
    labels = torch.randint(0, 5, (batch,))
    out: dict[str, float] = {}
    for name, collate in (("packed", collate_packed), ("padded", collate_padded)):
        ready = [collate(g) for g in groups]

        def run(ready: list[Any] = ready) -> None:
            for b in ready:
                optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(b), labels[:len(b)])
                loss.backward()
                optimizer.step()

        seconds = _time(run, 2)
        out[f"{name}_samples_per_s"] = batch * steps / seconds
    tokens_real = sum(len(it["time"]) for g in groups for it in g)
    tokens_padded = sum(len(g) * max(len(it["time"]) for it in g) for g in groups)
    out["padding_fraction"] = 1 - tokens_real / tokens_padded
    return out


def attention_alone(curves: list[Any], batch: int, steps: int, d_model: int = 64, heads: int = 4) -> dict[str, float]:
    groups = _batches(curves, batch, steps, seed=1)
    head = d_model // heads
    gen = torch.Generator().manual_seed(0)
    packed, padded = [], []
    for g in groups:
        lengths = torch.tensor([len(it["time"]) for it in g])
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        q, k, v = (torch.randn(int(lengths.sum()), heads, head, generator=gen, requires_grad=True) for _ in range(3))
        packed.append((q, k, v, cu, int(lengths.max())))
        longest = int(lengths.max())
        mask = torch.arange(longest)[None, :] < lengths[:, None]
        qp, kp, vp = (torch.randn(len(g), heads, longest, head, generator=gen, requires_grad=True) for _ in range(3))
        padded.append((qp, kp, vp, mask))

    def run_packed() -> None:
        for q, k, v, cu, longest in packed:
            varlen_attention(q, k, v, cu, cu, longest, longest).sum().backward()

    def run_padded() -> None:
        for q, k, v, mask in padded:
            attention(q, k, v, key_padding_mask=mask).sum().backward()

    return {"packed_ms_per_batch": 1000 * _time(run_packed, 3) / steps,
            "padded_ms_per_batch": 1000 * _time(run_padded, 3) / steps}


def serving_in_process(curves: list[Any]) -> dict[str, float]:
    from services.transients import inference
    from shared.tracking import LoadedModel

    model, cfg, state = _native_model()
    loaded = LoadedModel(model.eval(), cfg, state, "transients")
    sample = curves[:256]
    one = _time(lambda: [inference.classify(loaded, [c]) for c in sample[:64]], 2) / 64
    batched = _time(lambda: [inference.classify(loaded, sample[i:i + 64]) for i in range(0, len(sample), 64)], 2)
    return {"ms_per_curve_alone": 1000 * one, "curves_per_s_batched": len(sample) / batched}


def serving_http(url: str, curves: list[Any], requests: int, concurrency: int) -> dict[str, Any]:
    from pipelines.benchmarks.serve_throughput import load
    from services.transients.client import _object

    body = {"objects": [_object(curves[0])]}
    endpoint = f"{url.rstrip('/')}/classify"
    alone = asyncio.run(load(endpoint, body, max(20, requests // 5), 1))
    loaded = asyncio.run(load(endpoint, body, requests, concurrency))
    return {"sequential": alone, "concurrent": loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--url", default=None, help="a running transients service (e.g. http://127.0.0.1:3003)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    curves, name = _curves(args.data)
    lengths = np.array([len(c) for c in curves])
    print(f"{name}: {len(curves)} light curves, points per curve median {int(np.median(lengths))}, "
          f"mean {lengths.mean():.1f}, max {lengths.max()}; batches of {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    train = train_throughput(curves, args.batch, args.steps)
    print(f"training (native, d_model 64): packed {train['packed_samples_per_s']:.0f} samples/s, padded to the "
          f"longest {train['padded_samples_per_s']:.0f} samples/s: {train['packed_samples_per_s'] / train['padded_samples_per_s']:.2f}x "  # noqa: E501
          f"(padding is {100 * train['padding_fraction']:.0f} % of the padded tokens)")
    att = attention_alone(curves, args.batch, args.steps)
    print(f"attention alone (forward + backward): packed {att['packed_ms_per_batch']:.2f} ms/batch, padded "
          f"{att['padded_ms_per_batch']:.2f} ms/batch: {att['padded_ms_per_batch'] / att['packed_ms_per_batch']:.2f}x")
    serve = serving_in_process(curves)
    print(f"serving in-process: {serve['ms_per_curve_alone']:.2f} ms for one light curve, "
          f"{serve['curves_per_s_batched']:.0f} light curves/s in batches of 64")
    if args.url:
        found = serving_http(args.url, curves, args.requests, args.concurrency)
        for kind, r in found.items():
            print(f"POST /classify ({kind}, {r['concurrency']} in flight, one object each): {r['rps']:.1f} requests/s, "
                  f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, {r['errors']} errors of {r['requests']}")
        print(f"concurrent / sequential throughput: {found['concurrent']['rps'] / found['sequential']['rps']:.2f}x")


if __name__ == "__main__":
    main()
