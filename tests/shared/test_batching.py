"""shared.batching.Batcher: requests that wait together run as one batch, each gets its own results back."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from shared.batching import Batcher


class Model:
    """Records the batches it ran (on which thread), optionally slow or failing."""

    def __init__(self, name: str = "m", seconds: float = 0.0, fail_on: object = None) -> None:
        self.name, self.seconds, self.fail_on = name, seconds, fail_on
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()

    def __call__(self, model: Model, items: list[Any]) -> list[Any]:
        self.threads.add(threading.current_thread().name)
        model.batches.append(list(items))
        if model.seconds:
            time.sleep(model.seconds)
        if model.fail_on in items:
            raise ValueError(f"cannot do {model.fail_on}")
        return [(model.name, item * 10) for item in items]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_lone_request_runs_at_once_on_the_worker_thread() -> None:
    m = Model()
    batcher = Batcher(m, max_items=8, name="t")

    async def go() -> list[Any]:
        return await batcher.submit(m, [1, 2])

    started = time.perf_counter()
    assert run(go()) == [("m", 10), ("m", 20)]
    assert time.perf_counter() - started < 0.5  # no waiting window
    assert m.batches == [[1, 2]] and m.threads == {"t_0"} and batcher.stats.batches == 1
    batcher.close()


def test_requests_that_wait_together_run_as_one_batch_and_get_their_own_results() -> None:
    m = Model(seconds=0.2)
    batcher = Batcher(m, max_items=64, name="t")

    async def go() -> list[list[Any]]:
        first = asyncio.ensure_future(batcher.submit(m, [0]))
        await asyncio.sleep(0.05)  # the first batch ([0]) now runs; these queue behind it
        rest = [asyncio.ensure_future(batcher.submit(m, list(range(i, i + i % 3 + 1)))) for i in range(1, 11)]
        return await asyncio.gather(first, *rest)

    answers = run(go())
    assert answers[0] == [("m", 0)]
    for i, got in enumerate(answers[1:], start=1):
        assert got == [("m", 10 * j) for j in range(i, i + i % 3 + 1)]
    assert len(m.batches) == 2 and m.batches[0] == [0]  # ten requests, one batch
    assert batcher.stats.batches == 2 and batcher.stats.requests == 11 and batcher.stats.largest == len(m.batches[1])
    batcher.close()


def test_a_batch_holds_at_most_max_items_and_an_oversized_request_runs_alone() -> None:
    m = Model(seconds=0.05)
    batcher = Batcher(m, max_items=5, name="t")

    async def go() -> list[list[Any]]:
        blocker = asyncio.ensure_future(batcher.submit(m, [0]))
        await asyncio.sleep(0.02)
        queued = [asyncio.ensure_future(batcher.submit(m, [i, i])) for i in range(1, 6)]  # 10 items
        big = asyncio.ensure_future(batcher.submit(m, list(range(100, 108))))  # 8 > max_items
        return await asyncio.gather(blocker, *queued, big)

    answers = run(go())
    assert answers[-1] == [("m", 10 * j) for j in range(100, 108)]
    assert all(len(b) <= 5 for b in m.batches if 100 not in b)
    assert [b for b in m.batches if 100 in b] == [list(range(100, 108))]
    assert sorted(i for b in m.batches for i in b) == sorted([0, *[i for i in range(1, 6) for _ in (0, 1)],
                                                             *range(100, 108)])
    batcher.close()


def test_a_batch_never_mixes_models_and_each_request_runs_on_the_model_it_was_checked_against() -> None:
    old, new = Model("v1", seconds=0.1), Model("v2")
    batcher = Batcher(old, max_items=64, name="t")  # run() is old.__call__; it reads the model it is given

    async def go() -> list[list[Any]]:
        blocker = asyncio.ensure_future(batcher.submit(old, [0]))
        await asyncio.sleep(0.03)
        mixed = [asyncio.ensure_future(batcher.submit(old if i % 2 else new, [i])) for i in range(1, 7)]
        return await asyncio.gather(blocker, *mixed)

    answers = run(go())
    for i, got in enumerate(answers[1:], start=1):
        assert got == [("v1" if i % 2 else "v2", 10 * i)]
    assert old.batches == [[0], [1, 3, 5]] and new.batches == [[2, 4, 6]]
    batcher.close()


def test_an_error_reaches_every_request_of_its_batch_and_the_batcher_goes_on() -> None:
    m = Model(seconds=0.1, fail_on=3)
    batcher = Batcher(m, max_items=64, name="t")

    async def go() -> list[Any]:
        blocker = asyncio.ensure_future(batcher.submit(m, [0]))
        await asyncio.sleep(0.03)
        batch = [asyncio.ensure_future(batcher.submit(m, [i])) for i in (2, 3, 4)]
        answers = await asyncio.gather(blocker, *batch, return_exceptions=True)
        after = await batcher.submit(m, [5])
        return [*answers, after]

    answers = run(go())
    assert answers[0] == [("m", 0)]
    assert all(isinstance(a, ValueError) and "cannot do 3" in str(a) for a in answers[1:4])
    assert answers[4] == [("m", 50)]
    batcher.close()


def test_a_caller_that_went_away_is_not_computed_and_the_others_still_get_answers() -> None:
    m = Model(seconds=0.1)
    batcher = Batcher(m, max_items=64, name="t")

    async def go() -> list[Any]:
        blocker = asyncio.ensure_future(batcher.submit(m, [0]))
        await asyncio.sleep(0.03)
        gone = asyncio.ensure_future(batcher.submit(m, [1]))
        kept = asyncio.ensure_future(batcher.submit(m, [2]))
        await asyncio.sleep(0)
        gone.cancel()  # a client disconnected: BentoML cancels its request
        return await asyncio.gather(blocker, kept)

    assert run(go()) == [[("m", 0)], [("m", 20)]]
    assert m.batches == [[0], [2]]
    batcher.close()


def test_a_run_that_returns_the_wrong_number_of_results_is_an_error_not_a_shifted_answer() -> None:
    batcher = Batcher(lambda model, items: items[:-1], max_items=8, name="t")
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        run(batcher.submit(None, [1, 2]))
    with pytest.raises(ValueError, match="max_items"):
        Batcher(lambda model, items: items, max_items=0)
    batcher.close()
