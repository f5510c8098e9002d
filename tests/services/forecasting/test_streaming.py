"""Forecasting data larger than memory: the streamed, memory-mapped series equals the in-memory one, its cache
is reused and never half-written, and a training run's memory does not grow with the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from services.forecasting import streaming
from services.forecasting.data import WindowDataset, prepare, read_table, synthetic_frame
from services.forecasting.streaming import MappedRows, in_memory_mb, prepare_streamed


@pytest.fixture()
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "BATCH_ROWS", 700)  # many batches, none aligned with a split border


def _gappy(steps: int = 5000) -> pd.DataFrame:
    frame = synthetic_frame(steps, 4)
    frame.loc[:10, "v1"] = np.nan  # a leading gap (filled backward in memory)
    frame.loc[2790:2810, "v2"] = np.nan  # a gap across a batch boundary (filled forward)
    return frame


@pytest.mark.parametrize("suffix", ["parquet", "csv", "csv.gz"])
def test_streamed_series_equals_the_in_memory_one(tmp_path: Path, small_batches: None, suffix: str) -> None:
    path = tmp_path / f"series.{suffix}"
    frame = _gappy()
    if suffix == "parquet":
        frame.to_parquet(path, row_group_size=1100)
    else:
        frame.to_csv(path, index=False)
    whole = prepare(read_table(path), seq_len=48, pred_len=24, name="series")
    streamed = prepare_streamed(str(path), seq_len=48, pred_len=24, cache=tmp_path / "cache", log=lambda _: None)
    assert isinstance(streamed.values, MappedRows) and streamed.borders == whole.borders
    np.testing.assert_array_equal(np.asarray(streamed.values), whole.values)
    np.testing.assert_array_equal(np.asarray(streamed.marks), whole.marks)
    np.testing.assert_allclose(streamed.state.mean.numpy(), whole.state.mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(streamed.state.std.numpy(), whole.state.std.numpy(), rtol=1e-13)
    assert (streamed.state.columns, streamed.state.marks, streamed.state.step_seconds, streamed.state.rows) == (
        whole.state.columns, whole.state.marks, whole.state.step_seconds, whole.state.rows)
    a, b = whole.borders[2]
    in_memory = WindowDataset(whole.values[a:b], whole.marks[a:b], 48, 24, 24)
    mapped = WindowDataset(streamed.values[a:b], streamed.marks[a:b], 48, 24, 24)
    assert len(mapped) == len(in_memory)
    for index in (0, 311, len(mapped) - 1):
        for left, right in zip(in_memory[index], mapped[index], strict=True):
            assert torch.equal(left, right)


def test_mapped_windows_pickle_as_a_path_for_loader_workers(tmp_path: Path) -> None:
    path = tmp_path / "series.parquet"
    synthetic_frame(20000, 7).to_parquet(path)
    streamed = prepare_streamed(str(path), seq_len=96, pred_len=96, cache=tmp_path / "cache", log=lambda _: None)
    a, b = streamed.borders[0]
    train = WindowDataset(streamed.values[a:b], streamed.marks[a:b], 96, 48, 96)
    assert len(pickle.dumps(train)) < 2000  # the path and the row range, not 20000 x 11 floats
    loader = DataLoader(train, batch_size=8, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    x, y, x_mark, y_mark = next(iter(loader))
    assert x.shape == (8, 96, 7) and y.shape == (8, 96, 7) and y_mark.shape == (8, 48 + 96, 4)


def test_the_cache_is_reused_and_a_half_written_one_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "series.parquet"
    synthetic_frame(3000, 3).to_parquet(path)
    cache = tmp_path / "cache"
    first: list[str] = []
    prepare_streamed(str(path), seq_len=48, pred_len=24, cache=cache, log=first.append)
    assert "pass 3 of 3" in first[-1]
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    again: list[str] = []
    prepare_streamed(str(path), seq_len=96, pred_len=96, cache=cache, log=again.append)  # other windows, same data
    assert again == [f"using the cached copy of series in {folder}"]
    # a build killed half-way leaves only a .partial folder, which is never read as the cache
    (folder / "meta.json").rename(tmp_path / "meta.json")
    rebuilt: list[str] = []
    prepare_streamed(str(path), seq_len=48, pred_len=24, cache=cache, log=rebuilt.append)
    assert "pass 1 of 3" in rebuilt[0] and (folder / "meta.json").exists()


def test_streaming_refuses_what_the_in_memory_reader_refuses(tmp_path: Path, small_batches: None) -> None:
    text = tmp_path / "text.csv"
    pd.DataFrame({"date": pd.date_range("2020", periods=3000, freq="h"), "a": 1.0, "b": "x"}).to_csv(text, index=False)
    with pytest.raises(ValueError, match=r"non-numeric columns \['b'\]"):
        prepare_streamed(str(text), seq_len=24, pred_len=24, cache=tmp_path / "c1", log=lambda _: None)
    empty = tmp_path / "empty.parquet"
    frame = synthetic_frame(3000, 2)
    frame["v1"] = np.nan
    frame.to_parquet(empty)
    with pytest.raises(ValueError, match="a column is entirely missing"):
        prepare_streamed(str(empty), seq_len=24, pred_len=24, cache=tmp_path / "c2", log=lambda _: None)
    short = tmp_path / "ETTshort.parquet"
    synthetic_frame(3000, 2).to_parquet(short)
    with pytest.raises(ValueError, match="ETT split needs 14400 rows, the file has 3000"):
        prepare_streamed(str(short), seq_len=24, pred_len=24, cache=tmp_path / "c3", log=lambda _: None)
    assert not [p for p in (tmp_path / "c3").iterdir() if p.is_dir()]  # nothing half-built stays behind


def test_large_files_stream_and_small_ones_stay_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import registry

    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "series.parquet"
    synthetic_frame(4000, 7).to_parquet(path)
    assert in_memory_mb(str(path)) == pytest.approx(4000 * 8 * 8 / 2**20)
    domain = registry.get("forecasting")
    settings = {"seq_len": 48, "label_len": 24, "pred_len": 24}
    held = domain.load_data(domain.make_config("itransformer", str(path), settings))
    streamed = domain.load_data(domain.make_config("itransformer", str(path), {**settings, "max_in_memory_mb": 0}))
    assert isinstance(held.train.values, torch.Tensor) and isinstance(streamed.train.values, MappedRows)
    assert held.state.metadata() == streamed.state.metadata()
    torch.testing.assert_close(held.state.std, streamed.state.std, rtol=1e-12, atol=0)
    assert (tmp_path / "cache" / "forecasting").is_dir()


def test_a_file_in_an_object_store_streams_and_reads_like_a_local_one(s3: str, tmp_path: Path,
                                                                      small_batches: None) -> None:
    import s3fs

    local = tmp_path / "series.parquet"
    _gappy().to_parquet(local, row_group_size=1000)
    uri = f"{s3}/forecasting/series.parquet"
    s3fs.S3FileSystem().put(str(local), uri)
    streamed = prepare_streamed(uri, seq_len=48, pred_len=24, cache=tmp_path / "cache", log=lambda _: None)
    whole = prepare(read_table(uri), seq_len=48, pred_len=24, name="series")
    here = prepare(read_table(local), seq_len=48, pred_len=24, name="series")
    np.testing.assert_array_equal(np.asarray(streamed.values), here.values)
    np.testing.assert_array_equal(whole.values, here.values)
    assert streamed.state.fingerprint is not None and streamed.state.dataset == "series"
    assert in_memory_mb(uri) == in_memory_mb(str(local))


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_training_from_a_parquet_file_larger_than_the_memory_limit(tmp_path: Path) -> None:
    """Both files stream (limit 16 MB): a 2.4M-row file (311 MB as float64) trains with the heap of a run on
    one of its 250k-row row groups. (Reading a row group takes a bounded heap; the series never is.)"""
    from pipelines.benchmarks.forecasting_memory import TINY, train_and_watch, write_series

    small = write_series(tmp_path / "small.parquet", 250_000)
    large = write_series(tmp_path / "large.parquet", 2_400_000)
    large_mb = in_memory_mb(str(large))
    assert large_mb > 290 and in_memory_mb(str(small)) > 16
    small_peak, _, small_result, _ = train_and_watch(small, tmp_path, [*TINY, "max_in_memory_mb=16"])
    large_peak, _, large_result, log = train_and_watch(large, tmp_path, [*TINY, "max_in_memory_mb=16"])
    assert "streaming large into" in log and "pass 3 of 3" in log
    for result in (small_result, large_result):
        assert np.isfinite(result["test_mse"]) and result["epochs_run"] == 1
    growth = large_peak - small_peak
    print(f"peak heap: {small_peak:.0f} MB (250k rows) vs {large_peak:.0f} MB (2.4M rows, {large_mb:.0f} MB); "
          f"growth {growth:.0f} MB")
    assert growth < 64, f"the heap grew by {growth:.0f} MB with a {large_mb:.0f} MB file"
