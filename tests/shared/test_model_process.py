"""shared.model_process: a domain's model calls in a child process (unit tests with a real child, no server)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.model_process import ModelProcess, ModelProcessError, resolve

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def process() -> Iterator[ModelProcess]:
    running = ModelProcess("tests.shared.model_functions:scaled", name="test-model", env=ENV)
    yield running
    running.close()


def test_runs_the_function_in_another_process_on_the_model_it_was_sent(process: ModelProcess) -> None:
    model = {"factor": 2.0}
    results = process(model, [1.0, 2.5])
    assert [value for value, _ in results] == [2.0, 5.0]
    child = results[0][1]
    assert child != os.getpid() and child == process.pid
    assert process(model, [4.0]) == [(8.0, child)]  # the same child, the model sent once
    assert process.starts == 1


def test_keeps_the_last_two_models_and_sends_a_forgotten_one_again(process: ModelProcess) -> None:
    models = [{"factor": float(k)} for k in (1, 2, 3)]
    for model in models:
        process(model, [1.0])
    assert list(process._models.values()) == models[1:]  # the first was forgotten, on both sides
    assert [value for value, _ in process(models[0], [1.0])] == [1.0]  # sent again, not mixed up
    assert [value for value, _ in process(models[2], [1.0])] == [3.0]
    process.warm(models[1])  # the model only, no batch
    assert [value for value, _ in process(models[1], [2.0])] == [4.0]


def test_the_functions_error_reaches_the_caller_and_the_child_lives_on() -> None:
    process = ModelProcess("tests.shared.model_functions:fails", name="test-model", env=ENV)
    try:
        with pytest.raises(ValueError, match="model 1 refuses 2 items"):
            process({"factor": 1}, [1.0, 2.0])
        child = process.pid
        with pytest.raises(ValueError):
            process({"factor": 1}, [1.0])
        assert process.pid == child and process.starts == 1
    finally:
        process.close()


def test_a_child_that_dies_fails_its_batch_and_is_started_again() -> None:
    process = ModelProcess("tests.shared.model_functions:dies", name="test-model", env=ENV)
    try:
        with pytest.raises(ModelProcessError, match="exit code 3"):
            process({"factor": 1}, [1.0])
        assert process.pid is None
        process.function = "tests.shared.model_functions:scaled"  # the next start runs the good one
        assert [value for value, _ in process({"factor": 5}, [1.0])] == [5.0]
        assert process.starts == 2
    finally:
        process.close()


def test_a_service_answers_503_for_the_batch_of_a_child_that_died() -> None:
    from shared.serving import ModelUnavailable, in_model_process

    process = ModelProcess("tests.shared.model_functions:dies", name="test-model", env=ENV)
    try:
        with pytest.raises(ModelUnavailable, match="exit code 3.*try again") as info:
            in_model_process(process, {"factor": 1}, [1.0])  # type: ignore[arg-type]
        assert info.value.status == 503
    finally:
        process.close()


def test_close_ends_the_child(process: ModelProcess) -> None:
    process({"factor": 1}, [1.0])
    child = process.pid
    assert child is not None
    process.close()
    assert process.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # reaped, not a zombie


def test_a_wrong_function_name_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="package.module:function"):
        resolve("no_colon")
    with pytest.raises(AttributeError):
        ModelProcess("tests.shared.model_functions:missing")


def test_a_model_that_cannot_be_pickled_is_an_error_and_not_remembered_as_sent(process: ModelProcess) -> None:
    unpicklable = {"factor": 1.0, "lock": threading.Lock()}
    with pytest.raises(TypeError):
        process(unpicklable, [1.0])
    assert not any(held is unpicklable for held in process._models.values())
    assert [value for value, _ in process({"factor": 3.0}, [1.0])] == [3.0]  # the child goes on


def _batch_functions() -> list[str]:
    import importlib

    from shared import registry

    found = []
    for name in registry.names():
        module, cls = registry.get(name).service.split(":")
        service = getattr(importlib.import_module(module), cls)
        function = getattr(getattr(service, "inner", service), "batch_function", None)  # the @bentoml.service's class
        if function:
            found.append(function)
    return found


def test_a_model_process_imports_neither_mlflow_nor_bentoml() -> None:
    """What a domain's model process imports to run its batches and unpickle its model (about 60-80 MB less
    memory per service without the tracking client and the server)."""
    import subprocess
    import sys

    functions = _batch_functions()
    assert len(functions) >= 3  # forecasting, transients, robot_policy
    code = ("import sys, importlib; import shared.model_process, shared.loaded; "
            "[importlib.import_module(f.split(':')[0]) for f in sys.argv[1:]]; "
            "print(sorted(m for m in ('mlflow', 'bentoml', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *functions], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **ENV}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{functions}: {result.stdout}"
