"""One real local stack (Ray head, MLflow server, every registered domain's BentoML service) for the
integration tests, and each domain's tiny model trained on it once, as a Ray job.

It runs on ports of its own (so a developer's running stack is untouched) with its state in a temp folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from shared import registry

DOMAINS = registry.names()
# Outside Ray's worker port range (10002-19999) and clear of the default stack's ports: each service on
# 20000 + its Domain.port.
PORTS = {"MLFLOW": 25500, "RAY": 26390, "DASHBOARD": 28290, "RAY_CLIENT": 20101, "RAY_AGENT": 52465,
         **{name.upper(): 20000 + registry.get(name).port for name in DOMAINS}}
SMOKE = ["cpus_per_worker=1"]  # on top of each domain's tiny settings: one thread per job on the CI machine


def overrides(settings: Mapping[str, Any]) -> list[str]:
    """``key=value`` strings of a settings mapping (tuples as JSON lists, which --set parses)."""
    out = []
    for key, value in settings.items():
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, tuple | list) else str(value)
        out.append(f"{key}={text}")
    return out


def tiny(name: str) -> list[str]:
    """A domain's tiny training settings as --set arguments."""
    return overrides(registry.get(name).tiny) + SMOKE


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("tessera-home")
    ray_tmp = Path(f"/tmp/tsr{os.getpid()}")  # short: Ray's socket paths must stay under 107 bytes
    with contextlib.suppress(pytest.skip.Exception):  # the S3 server first: its AWS_* reach the Ray head
        request.getfixturevalue("s3")
    env = {f"TESSERA_{k}_PORT": str(v) for k, v in PORTS.items()}
    env.update(TESSERA_HOME=str(home), TESSERA_RAY_TMP=str(ray_tmp), TESSERA_RELOAD_SECONDS="2",
               TESSERA_CACHE=str(home / "cache"))
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_TRACKING_URI", "RAY_ADDRESS"]}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    from infra import stack

    os.environ["MLFLOW_TRACKING_URI"] = stack.mlflow_url()
    try:
        stack.up(DOMAINS, num_cpus=2, timeout=300)
        yield env
    finally:
        stack.down(DOMAINS)
        restore_environ(saved)


def restore_environ(saved: Mapping[str, str | None]) -> None:
    """Put environment variables back as ``saved`` recorded them (None: it was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def submit_job(module: str, domain: str, model: str | None, settings: list[str],
               extra: list[str] | None = None) -> tuple[int, dict[str, Any] | None]:
    """``python -m <module> <domain> ...`` as a Ray job on the test stack, followed to the end: its exit code
    and the JSON object of its last line."""
    from infra import stack
    from pipelines.cli import job_entrypoint, submit_and_follow

    entrypoint = job_entrypoint(module, domain, model, None, settings, extra)
    return submit_and_follow(entrypoint, stack.dashboard_url(), None)


def wait_until_served(name: str, version: int | str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """``/model`` of the domain's service once it serves a model (``version``, when given)."""
    from infra import stack
    from shared.client import wait_for_model

    info = wait_for_model(stack.service_url(name), version, timeout=timeout)
    assert info and (version is None or str(info["version"]) == str(version)), f"{name} serves {info}"
    return info


_TRAINED: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def trained(stack_env: dict[str, str]) -> Any:
    """``trained(name)``: the result of the domain's tiny training job (a Ray job, run once per session) once
    its service serves that model."""

    def get(name: str) -> dict[str, Any]:
        if name not in _TRAINED:
            domain = registry.get(name)
            code, result = submit_job("pipelines.train", name, domain.models[0], tiny(name))
            assert code == 0 and result is not None, f"the {name} training job failed"
            wait_until_served(name, result["version"])
            _TRAINED[name] = result
        return _TRAINED[name]

    return get


def url(name: str, route: str | None = None) -> str:
    from infra import stack

    return stack.service_url(name) + (route if route is not None else registry.get(name).endpoint)


def eventually(check: Any, timeout: float = 60.0, every: float = 2.0) -> Any:
    """``check()`` until it returns something truthy (its value), or its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(every)
        value = check()
    return value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault tests stop and restart parts of the shared stack and register more versions (tests elsewhere
    count on the first ones): they run after every other test."""
    items.sort(key=lambda item: "test_faults.py" in item.nodeid)
