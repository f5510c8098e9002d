"""A domain's model calls in a child process of their own.

Why: a service process runs its event loop (parsing, checks, BentoML's middlewares: Python, holding the GIL
nearly all the time under load) beside the model. PyTorch releases the GIL inside every operator and takes it
back after it, so a forward of a few hundred small operators on a thread of the service process waits for the
GIL a few hundred times: under 100 clients a batch of 50 forecasts took 160-190 ms of wall time for 26-28 ms
of CPU. A child process has its own interpreter and GIL: the model runs at its own speed on the other core, and
the event loop only hands it arrays.

:class:`ModelProcess` is a callable ``(model, items) -> results`` for :class:`shared.batching.Batcher`'s
worker thread. It starts ``python -m shared.model_process`` with two pipes, sends each model (a pickled
:class:`shared.tracking.LoadedModel`) once, keeps the last two on both sides (a request checked against the
version before a swap still runs on that version), and sends the items of each batch. The child runs
``function(model, items)``, a module-level function named ``"package.module:function"``. The child exits when
its pipe closes (the service process ended, however it ended); a child that died is started again at the next
batch, and the batch it was running fails with a :class:`ModelProcessError`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

KEEP_MODELS = 2  # the served model and the one before a swap


class ModelProcessError(RuntimeError):
    """The model process died or could not start (the batch it ran has no results)."""


def resolve(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module), name)


class ModelProcess:
    """Runs ``function(model, items)`` in a child process (see the module's docstring). Thread-safe; one call
    runs at a time."""

    def __init__(self, function: str, *, name: str = "model", threads: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        resolve(function)  # a wrong name fails here, in the service's start-up, not at the first request
        self.function = function
        self.name = name
        self.threads = threads
        self.env = env
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._receive: Connection | None = None
        self._models: OrderedDict[int, Any] = OrderedDict()  # key -> model object the child holds (kept alive)
        self._next_key = 0
        self.starts = 0

    def __call__(self, model: Any, items: Sequence[Any]) -> Sequence[Any]:
        return self._ask(model, list(items))

    def warm(self, model: Any) -> None:
        """Start the child (if it is not running) and give it ``model`` ahead of its first batch."""
        self._ask(model, None)

    def _ask(self, model: Any, items: list[Any] | None) -> Sequence[Any]:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            key, payload, forget = self._key(model)
            assert self._send is not None and self._receive is not None
            try:
                message = _dumps((key, payload, forget, items))
            except Exception:
                if payload is not None:  # the child never got this model
                    self._models.pop(key, None)
                raise
            try:
                self._send.send_bytes(message)
                ok, value = pickle.loads(self._receive.recv_bytes())
            except (EOFError, OSError) as exc:
                code = self._stop(kill=True)
                raise ModelProcessError(f"the {self.name} process ended while running a batch "
                                        f"(exit code {code}); it starts again with the next one") from exc
            if not ok:
                raise value
            return value

    def _key(self, model: Any) -> tuple[int, Any, list[int]]:
        """The child's key of ``model``; the model itself when the child does not have it yet, and the keys it
        should forget."""
        for key, held in self._models.items():
            if held is model:
                self._models.move_to_end(key)
                return key, None, []
        key, self._next_key = self._next_key, self._next_key + 1
        self._models[key] = model
        forget = []
        while len(self._models) > KEEP_MODELS:
            forget.append(self._models.popitem(last=False)[0])
        return key, model, forget

    def _start(self) -> None:
        self._stop(kill=True)
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        env = {**os.environ, **(self.env or {})}
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "shared.model_process", str(child_reads), str(child_writes), self.function,
                 str(self.threads or 0)], pass_fds=(child_reads, child_writes), env=env, close_fds=True)
        except OSError as exc:
            for fd in (parent_reads, parent_writes):
                os.close(fd)
            raise ModelProcessError(f"the {self.name} process could not start: {exc}") from exc
        finally:
            os.close(child_reads)
            os.close(child_writes)
        self._send = Connection(parent_writes, readable=False)
        self._receive = Connection(parent_reads, writable=False)
        self._models.clear()
        self.starts += 1

    def _stop(self, kill: bool = False, timeout: float = 5.0) -> int | None:
        """Close the pipes (the child exits on their end), wait for the child; its exit code."""
        for conn in (self._send, self._receive):
            if conn is not None:
                conn.close()
        self._send = self._receive = None
        process, self._process = self._process, None
        if process is None:
            return None
        if kill and process.poll() is None:
            process.kill()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def close(self) -> None:
        """End the child (after the batch it runs now)."""
        with self._lock:
            self._stop()


def _dumps(value: Any) -> bytes:
    # plain pickle: multiprocessing's own pickler would hand torch tensors over as shared-memory handles that
    # need a resource-sharing server this pair of pipes does not have
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _serve(receive: Connection, send: Connection, function: Callable[[Any, list[Any]], Sequence[Any]]) -> None:
    models: dict[int, Any] = {}
    while True:
        try:
            key, payload, forget, items = pickle.loads(receive.recv_bytes())
        except EOFError:  # the service process closed the pipe or ended
            return
        for old in forget:
            models.pop(old, None)
        if payload is not None:
            models[key] = payload
        if items is None:  # the model only (ModelProcess.warm)
            send.send_bytes(_dumps((True, [])))
            continue
        try:
            answer = _dumps((True, list(function(models[key], items))))
        except Exception as exc:  # the model's error belongs to every request of the batch, in the parent
            try:
                answer = _dumps((False, exc))
            except Exception:  # not picklable: its type and message
                answer = _dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
        send.send_bytes(answer)


def main(argv: list[str]) -> int:
    reading, writing, target, threads = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    if threads:  # torch's intra-op threads (0: leave them)
        import torch

        torch.set_num_threads(threads)
    function = resolve(target)
    _serve(Connection(reading, writable=False), Connection(writing, readable=False), function)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
