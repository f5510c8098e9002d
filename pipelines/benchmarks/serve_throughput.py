"""Benchmark: ``POST /forecast`` under concurrent load, with BentoML adaptive batching on.

    python -m pipelines.benchmarks.serve_throughput [--url http://127.0.0.1:3001] [--requests 400] [--concurrency 32]

Needs the stack up with a forecasting model served (``make demo`` or ``tessera up`` + ``tessera train``).
Sends the same number of requests one at a time (the baseline) and with ``--concurrency`` in flight, and
prints requests/s and p50/p99 latency for both and the throughput ratio. Traffic goes to loopback only; the
request count bounds the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx


def example_body(meta: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from services.forecasting.data import synthetic_frame

    rows, columns = meta["seq_len"], meta["columns"]
    frame = synthetic_frame(rows + 10, len(columns)).tail(rows)
    body: dict[str, Any] = {"columns": columns, "values": frame.drop(columns="date").to_numpy().tolist()}
    if meta.get("marks"):
        step = pd.Timedelta(seconds=meta["step_seconds"] or 3600)
        body["timestamps"] = [(pd.Timestamp("2024-01-01") + i * step).isoformat() for i in range(rows)]
    return body


async def load(url: str, body: dict[str, Any], total: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(url, json=body)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": total, "concurrency": concurrency, "errors": errors, "rps": total / elapsed,
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="service URL (default: the local stack's forecasting)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.url is None:
        from infra.stack import service_url

        args.url = service_url("forecasting")
    meta = httpx.post(f"{args.url}/model", timeout=30).json()
    if "error" in meta:
        raise SystemExit(f"no model served at {args.url}: {meta['error']}")
    body = example_body(meta)
    url = f"{args.url}/forecast"
    asyncio.run(load(url, body, 20, 4))  # warm-up
    sequential = asyncio.run(load(url, body, max(50, args.requests // 4), 1))
    concurrent = asyncio.run(load(url, body, args.requests, args.concurrency))
    print(f"/forecast with {meta['architecture']} v{meta['version']} ({len(meta['columns'])} variables, "
          f"lookback {meta['seq_len']}, horizon {meta['pred_len']})")
    print(f"{'mode':<26}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    modes = (("sequential (1 in flight)", sequential), (f"concurrent ({args.concurrency} in flight)", concurrent))
    for label, r in modes:
        print(f"{label:<26}{r['requests']:>9}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}")
    print("throughput with adaptive batching under load vs one at a time: "
          f"{concurrent['rps'] / sequential['rps']:.2f}x")
    if args.json:
        print(json.dumps({"sequential": sequential, "concurrent": concurrent}))
    if sequential["errors"] or concurrent["errors"]:
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
