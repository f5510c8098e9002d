"""The heap of a forecasting training run against the size of its Parquet file: streamed into the memory-mapped
cache, and read whole.

Writes hourly series of 16 variables (250k and 2.4M rows: 34 and 311 MB as float64), then trains a tiny
iTransformer for 20 steps on each in a process of its own (``python -m pipelines.train --no-ray``), sampling
the process's anonymous memory (heap; the mapped file's pages are the kernel's cache, not the worker's) every
20 ms from outside. Rows: both files streamed (``max_in_memory_mb=16``), then the large one read whole.

Run: ``python -m pipelines.benchmarks.forecasting_memory [--rows 250000 2400000] [--folder DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TINY = ["d_model=16", "d_ff=32", "e_layers=1", "n_heads=2", "seq_len=96", "label_len=48", "pred_len=24",
        "batch_size=32", "epochs=1", "max_steps_per_epoch=20", "max_eval_batches=4", "cpus_per_worker=1"]
TRAIN = """
import json, sys
from pipelines.train import run
result = run(["forecasting", "--no-ray", "--no-register", "--data", sys.argv[1], "--set", *sys.argv[2:]])
print("RESULT " + json.dumps(result))
"""


def write_series(path: Path, rows: int, columns: int = 16, group_rows: int = 250_000) -> Path:
    """An hourly series of ``rows`` x ``columns`` written in row groups of ``group_rows`` (never whole here)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, group_rows):
        n = min(group_rows, rows - start)
        t = np.arange(start, start + n)
        data: dict[str, Any] = {"date": pd.date_range(pd.Timestamp("2000-01-01") + pd.Timedelta(hours=start),
                                                      periods=n, freq="h")}
        for j in range(columns):
            data[f"v{j}"] = np.sin(2 * np.pi * t / 24 + j) + rng.normal(0, 0.3, n)
        table = pa.Table.from_pandas(pd.DataFrame(data), preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return path


def train_and_watch(data: Path, folder: Path, settings: list[str]) -> tuple[float, float, dict[str, Any], str]:
    """(peak anonymous memory in MB, seconds, the job's result, its log) of one training process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "TESSERA_CACHE": str(folder / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", TRAIN, str(data), *settings], cwd=folder, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = [0.0]

    def watch() -> None:
        pattern = re.compile(r"^Anonymous:\s+(\d+) kB", re.M)
        while process.poll() is None:
            try:
                text = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
            except OSError:
                break
            found = pattern.search(text)
            if found:
                peak[0] = max(peak[0], int(found.group(1)) / 1024)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    log, _ = process.communicate(timeout=1800)
    watcher.join()
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"training on {data.name} failed:\n{log[-3000:]}")
    line = next(line for line in log.splitlines() if line.startswith("RESULT "))
    return peak[0], seconds, json.loads(line[len("RESULT "):]), log


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from services.forecasting.streaming import in_memory_mb

    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmarks.forecasting_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[250_000, 2_400_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--folder", type=Path, default=None, help="where files and caches go (default: a temp dir)")
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        small = write_series(folder / "small.parquet", args.rows[0])
        large = write_series(folder / "large.parquet", args.rows[1])
        table = Table(title="forecasting training: peak heap vs file (tiny iTransformer, 20 steps, --no-ray)")
        for column in ("file", "rows", "as float64", "read", "peak heap", "over the small file's", "seconds"):
            table.add_column(column, justify="right")
        streamed, whole = [*TINY, "max_in_memory_mb=16"], [*TINY, "max_in_memory_mb=100000"]
        runs = [(small, "streamed", streamed), (large, "streamed", streamed), (large, "whole", whole)]
        base = None
        with console.status("training...") as status:
            for data, how, settings in runs:
                status.update(f"training on {data.name} ({how})")
                peak, seconds, result, _ = train_and_watch(data, folder, settings)
                base = peak if base is None else base
                rows = args.rows[0] if data == small else args.rows[1]
                table.add_row(data.name, f"{rows:,}", f"{in_memory_mb(str(data)):.0f} MB", how, f"{peak:.0f} MB",
                              f"{peak - base:+.0f} MB", f"{seconds:.1f}")
        console.print(table)


if __name__ == "__main__":
    main()
