"""Batching across requests inside one service process.

A :class:`Batcher` takes the work of many concurrent requests (each awaits ``submit``) and runs it as few calls
of one function on a single worker thread, so that the event loop goes on parsing, checking and answering
other requests while the model runs (the function may hand the work to another process and wait:
:class:`shared.model_process.ModelProcess`, what the services do). It batches continuously: while
one batch runs, new work queues; when the batch ends, everything queued (up to ``max_items``) forms the next
one. An idle service runs a lone request at once, with no waiting window to tune, and a busy one runs batches
as large as the load makes them.

Work is grouped by the model it was checked against (a request validated against version 3 runs on version 3,
even if version 4 was loaded meanwhile), and a batch never mixes models.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Work(Generic[T, R]):
    model: Any
    items: Sequence[T]
    done: asyncio.Future[list[R]]


@dataclass
class BatchStats:
    """What a batcher has run so far: batches, the requests and items in them, the largest batch."""

    batches: int = 0
    items: int = 0
    requests: int = 0
    largest: int = 0  # items

    def add(self, requests: int, items: int) -> None:
        self.batches += 1
        self.requests += requests
        self.items += items
        self.largest = max(self.largest, items)


class Batcher(Generic[T, R]):
    """Runs ``run(model, items)`` on one worker thread for the items of as many waiting requests as fit in
    ``max_items`` (a request with more items than that runs alone). ``run`` returns one result per item, in
    order; an exception it raises is raised in every request of that batch."""

    def __init__(self, run: Callable[[Any, list[T]], Sequence[R]], *, max_items: int, name: str = "batcher") -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self._run = run
        self.max_items = max_items
        self.name = name
        self._queue: deque[_Work[T, R]] = deque()
        self._draining = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.stats = BatchStats()

    async def submit(self, model: Any, items: Sequence[T]) -> list[R]:
        """The results of ``items`` (checked against ``model``), once a batch holding them has run."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        work: _Work[T, R] = _Work(model, items, loop.create_future())
        self._queue.append(work)
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await work.done

    def _next_batch(self) -> list[_Work[T, R]]:
        """The oldest waiting request and, after it, every waiting request on the same model that still fits."""
        first = self._queue.popleft()
        batch, size = [first], len(first.items)
        kept: deque[_Work[T, R]] = deque()
        while self._queue:
            work = self._queue.popleft()
            if work.done.done():  # its caller went away (a dropped connection): nothing to compute
                continue
            if work.model is first.model and size + len(work.items) <= self.max_items:
                batch.append(work)
                size += len(work.items)
            else:
                kept.append(work)
        self._queue.extendleft(reversed(kept))
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = [w for w in self._next_batch() if not w.done.done()]
                if not batch:
                    continue
                items = [item for work in batch for item in work.items]
                try:
                    results = await loop.run_in_executor(self._executor, self._call, batch[0].model, items)
                except Exception as exc:  # the model's error belongs to every request of the batch
                    for work in batch:
                        if not work.done.done():
                            work.done.set_exception(exc)
                    continue
                self.stats.add(len(batch), len(items))
                start = 0
                for work in batch:
                    end = start + len(work.items)
                    if not work.done.done():
                        work.done.set_result(list(results[start:end]))
                    start = end
        except BaseException as exc:  # cancelled (the server stops): nobody will run what waits
            while self._queue:
                work = self._queue.popleft()
                if not work.done.done():
                    work.done.set_exception(RuntimeError(f"{self.name} stopped: {exc!r}"))
            raise
        finally:
            self._draining = False

    def _call(self, model: Any, items: list[T]) -> Sequence[R]:
        results = self._run(model, items)
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        return results

    def close(self) -> None:
        """Stop the worker thread (after the batch that runs now); waiting requests are not run."""
        self._executor.shutdown(wait=False, cancel_futures=True)
