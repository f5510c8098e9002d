"""Forecasting data larger than memory: a CSV or Parquet file (local or a URI) read in row batches into a
memory-mapped cache, so that a worker holds the windows of its batches and never the whole series.

Three passes, each over bounded batches (``BATCH_ROWS`` rows):

1. the file → raw float64 values and int64 timestamps on disk (missing values filled forward as they stream;
   leading gaps take the first value, as ``ffill().bfill()`` does in memory);
2. the scaler from the training rows (Chan's pairwise update of the mean and the sum of squares, float64);
3. standardized float32 values and calendar features, written beside ``meta.json``.

The cache lives under ``$TESSERA_CACHE/forecasting/<content hash>-<split>-<marks>/`` and is written once: other
workers on the node wait on a file lock and map the same files, so the page cache holds one copy for all of
them. Its files are finished with an atomic rename, so a job killed half-way leaves nothing that looks complete.

Why not Ray Data: a training sample is a window that crosses row blocks, taken at random positions of a
series standardized with statistics of its training rows. Ray Data streams blocks of independent rows to each
worker; windows need random access to the whole series, which a shared memory map gives every worker on a node
without a copy per worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from shared import datapath

from .data import (
    ForecastingState,
    Prepared,
    calendar_features,
    checked_borders,
    find_time_column,
    infer_step,
    mark_names,
    split_borders,
    split_kind,
    usable_std,
)

BATCH_ROWS = 1 << 16
CACHE_VERSION = 1


def in_memory_mb(path: str) -> float:
    """What reading ``path`` whole would take as float64 values: rows x columns from a Parquet footer, the
    file size for CSV (a number in text takes about as many bytes as a float64)."""
    if datapath.table_format(path) == "parquet":
        import pyarrow.parquet as pq

        with datapath.open_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
            return meta.num_rows * meta.num_columns * 8 / 2**20
    return datapath.size(path) / 2**20


class MappedRows:
    """Rows ``[start, stop)`` of a (T, K) float32 file, mapped read-only on first use in each process (it
    pickles as its path, so DataLoader workers and Ray map the file themselves instead of copying it)."""

    def __init__(self, path: str | Path, rows: int, width: int, start: int = 0, stop: int | None = None) -> None:
        self.path, self.total, self.width = str(path), rows, width
        self.start, self.stop = start, rows if stop is None else stop
        self._map: np.ndarray | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.width

    def __getitem__(self, key: slice) -> MappedRows:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("MappedRows takes contiguous row ranges")
        return MappedRows(self.path, self.total, self.width, self.start + start, self.start + max(start, stop))

    def _array(self) -> np.ndarray:
        if self._map is None:
            if self.width == 0 or self.total == 0:
                self._map = np.zeros((self.total, self.width), np.float32)
            else:
                self._map = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.total, self.width))
        return self._map

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows ``[start, stop)`` of this range (a writable array torch can take)."""
        return np.array(self._array()[self.start + start: self.start + stop])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        rows = self.read(0, len(self))
        return rows if dtype is None else rows.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}


# --- reading the source in batches -------------------------------------------------------------------------


def _batches(path: str) -> Iterator[pd.DataFrame]:
    """The file as pandas frames of at most ``BATCH_ROWS`` rows."""
    if datapath.table_format(path) == "parquet":
        import pyarrow.parquet as pq

        with datapath.open_file(path) as handle:
            source = pq.ParquetFile(handle, buffer_size=1 << 22, pre_buffer=False)
            for batch in source.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
                yield batch.to_pandas()
        return
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with datapath.open_file(path) as handle:
        stream: Any = pa.CompressedInputStream(handle, "gzip") if datapath.suffix(path) == ".gz" else handle
        reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=1 << 22))
        for batch in reader:
            yield batch.to_pandas()


@dataclass
class _Raw:
    rows: int
    columns: list[str]
    time_column: str | None


def _stream_raw(path: str, values_file: Path, times_file: Path, name: str) -> _Raw:
    """Pass 1: raw float64 values and int64 nanosecond timestamps, missing values filled forward."""
    rows = 0
    columns: list[str] | None = None
    time_column: str | None = None
    carry: np.ndarray | None = None  # the last row (forward fill across batches)
    leading: np.ndarray | None = None  # per column: rows before its first value
    first: np.ndarray | None = None  # per column: its first value
    with open(values_file, "wb") as out_values, open(times_file, "wb") as out_times:
        for frame in _batches(path):
            if columns is None:
                time_column = find_time_column(frame)
                columns = [str(c) for c in frame.columns if str(c) != time_column]
            if time_column is not None:
                stamps = pd.DatetimeIndex(pd.to_datetime(frame[time_column]))
                out_times.write(np.asarray(stamps, dtype="datetime64[ns]").view(np.int64).tobytes())
                frame = frame.drop(columns=[time_column])
            if [str(c) for c in frame.columns] != columns:
                raise ValueError(f"{name}: the columns change within the file")
            non_numeric = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
            if non_numeric:
                raise ValueError(f"{name}: non-numeric columns {non_numeric}; keep one time column and numeric "
                                 f"variables")
            raw = np.array(frame.to_numpy(dtype=np.float64))  # a writable copy of the batch
            if carry is None:
                carry = np.full(raw.shape[1], np.nan)
                leading = np.zeros(raw.shape[1], np.int64)
                first = np.full(raw.shape[1], np.nan)
            assert leading is not None and first is not None
            missing = ~np.isfinite(raw)
            if missing.any():
                raw[missing] = np.nan
                raw = pd.DataFrame(np.vstack([carry[None], raw])).ffill().to_numpy()[1:]
            unseen = np.isnan(first)
            if unseen.any():
                valid = np.isfinite(raw)
                found = valid.any(axis=0)
                index = valid.argmax(axis=0)
                for j in np.flatnonzero(unseen):
                    if found[j]:
                        first[j] = raw[index[j], j]
                        leading[j] = rows + index[j]
                    else:
                        leading[j] = rows + len(raw)
            carry = raw[-1].copy()
            out_values.write(np.ascontiguousarray(raw).tobytes())
            rows += len(raw)
    if columns is None or rows == 0 or first is None or leading is None:
        raise ValueError(f"{name}: no rows")
    if np.isnan(first).any():
        raise ValueError(f"{name}: a column is entirely missing")
    if leading.any():  # the backward fill of the leading gaps, in place
        table = np.memmap(values_file, dtype=np.float64, mode="r+", shape=(rows, len(columns)))
        for j in np.flatnonzero(leading):
            table[: leading[j], j] = first[j]
        table.flush()
        del table
    return _Raw(rows, columns, time_column)


def _train_stats(table: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: mean and population std of rows [start, stop), combined batch by batch (Chan et al.)."""
    count, mean, m2 = 0, np.zeros(table.shape[1]), np.zeros(table.shape[1])
    for a in range(start, stop, BATCH_ROWS):
        block = np.asarray(table[a: min(stop, a + BATCH_ROWS)])
        n = len(block)
        block_mean = block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta = block_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta**2 * (count * n / total)
        count = total
    return mean, np.sqrt(m2 / count)


def _release_arrow_memory() -> None:
    """Give Arrow's freed batch buffers back to the system (its allocator keeps them for reuse otherwise)."""
    with contextlib.suppress(ImportError):
        import pyarrow as pa

        pa.default_memory_pool().release_unused()


def _cache_key(fingerprint: str, kind: str, time_features: bool) -> str:
    return f"{fingerprint}-{kind}-{'marks' if time_features else 'nomarks'}-v{CACHE_VERSION}"


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(path: str, folder: Path, *, kind: str, time_features: bool, name: str, log: Any) -> dict[str, Any]:
    """Passes 1-3 into ``folder`` (which must not exist yet); returns the cache's metadata."""
    work = folder.with_name(folder.name + f".{os.getpid()}.partial")
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"streaming {name} into {folder} (pass 1 of 3: reading)")
        raw = _stream_raw(path, work / "raw.f64", work / "times.i64", name)
        _release_arrow_memory()
        table = np.memmap(work / "raw.f64", dtype=np.float64, mode="r", shape=(raw.rows, len(raw.columns)))
        times: np.ndarray | None = None
        step: pd.Timedelta | None = None
        if raw.time_column is not None:
            times = np.memmap(work / "times.i64", dtype=np.int64, mode="r", shape=(raw.rows,))
            step = infer_step(pd.DatetimeIndex(np.asarray(times[:2000]).astype("datetime64[ns]")))
        train_rows = split_borders(raw.rows, 0, kind, step)[0]  # the scaler sees the training rows only
        log(f"streaming {name}: {raw.rows} rows x {len(raw.columns)} variables (pass 2 of 3: scaler)")
        mean, std = _train_stats(table, *train_rows)
        std = usable_std(std)
        names = mark_names(step) if (time_features and step is not None) else []
        log(f"streaming {name} (pass 3 of 3: standardized values and {len(names)} calendar features)")
        with open(work / "values.f32", "wb") as out_values, open(work / "marks.f32", "wb") as out_marks:
            for a in range(0, raw.rows, BATCH_ROWS):
                b = min(raw.rows, a + BATCH_ROWS)
                out_values.write(((np.asarray(table[a:b]) - mean) / std).astype(np.float32).tobytes())
                if names and times is not None:
                    stamps = pd.DatetimeIndex(np.asarray(times[a:b]).astype("datetime64[ns]"))
                    out_marks.write(calendar_features(stamps, names).tobytes())
        del table, times
        (work / "raw.f64").unlink()
        (work / "times.i64").unlink()
        meta = {"rows": raw.rows, "columns": raw.columns, "time_column": raw.time_column,
                "step_seconds": step.total_seconds() if step is not None else None, "marks": names,
                "mean": mean.tolist(), "std": std.tolist(), "source": path}
        (work / "meta.json").write_text(json.dumps(meta))
        work.replace(folder)
        return meta
    finally:
        if work.exists():
            shutil.rmtree(work)


def prepare_streamed(path: str, *, seq_len: int, pred_len: int, split: str = "auto", time_features: bool = True,
                     fingerprint: str | None = None, cache: Path | None = None, log: Any = print) -> Prepared:
    """What :func:`~services.forecasting.data.prepare` gives for the file at ``path``, with the values and
    marks memory-mapped from the cache (built on first use) instead of held in memory."""
    name = datapath.stem(path)
    kind = split_kind(split, name)
    fingerprint = fingerprint or datapath.fingerprint(path)
    root = cache or datapath.cache_dir("forecasting")
    root.mkdir(parents=True, exist_ok=True)
    folder = root / _cache_key(fingerprint, kind, time_features)
    with _locked(root / f"{folder.name}.lock"):
        if (folder / "meta.json").exists():
            meta = json.loads((folder / "meta.json").read_text())
            log(f"using the cached copy of {name} in {folder}")
        else:
            if folder.exists():  # an incomplete cache (no meta.json): built again from the start
                shutil.rmtree(folder)
            meta = _build(path, folder, kind=kind, time_features=time_features, name=name, log=log)
    rows, names = int(meta["rows"]), list(meta["marks"])
    step = pd.Timedelta(seconds=meta["step_seconds"]) if meta["step_seconds"] is not None else None
    borders = checked_borders(rows, seq_len, pred_len, kind, step, name)
    state = ForecastingState(
        dataset=name, fingerprint=fingerprint, columns=tuple(meta["columns"]), time_column=meta["time_column"],
        step_seconds=meta["step_seconds"], marks=tuple(names), split=kind,
        borders=tuple((int(a), int(b)) for a, b in borders), rows=rows,
        mean=torch.tensor(meta["mean"], dtype=torch.float64), std=torch.tensor(meta["std"], dtype=torch.float64))
    values = MappedRows(folder / "values.f32", rows, len(meta["columns"]))
    marks = MappedRows(folder / "marks.f32", rows, len(names))
    return Prepared(values=values, marks=marks, borders=borders, state=state)  # type: ignore[arg-type]
