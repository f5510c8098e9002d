"""One real local stack (Ray head, MLflow server, every domain's BentoML service) for the integration tests.

It runs on ports of its own (so a developer's running stack is untouched) with its state in a temp folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Outside Ray's worker port range (10002-19999) and clear of the default stack's ports.
PORTS = {"MLFLOW": 25500, "RAY": 26390, "DASHBOARD": 28290, "RAY_CLIENT": 20101, "RAY_AGENT": 52465,
         "FORECASTING": 23101, "WEATHER": 23102, "ROBOT_POLICY": 23105}
DOMAINS = ["forecasting", "weather", "robot_policy"]


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("tessera-home")
    ray_tmp = Path(f"/tmp/tsr{os.getpid()}")  # short: Ray's socket paths must stay under 107 bytes
    env = {f"TESSERA_{k}_PORT": str(v) for k, v in PORTS.items()}
    env.update(TESSERA_HOME=str(home), TESSERA_RAY_TMP=str(ray_tmp), TESSERA_RELOAD_SECONDS="2")
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
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def submit_job(module: str, domain: str, model: str | None, overrides: list[str],
               extra: list[str] | None = None) -> tuple[int, dict[str, Any] | None]:
    """``python -m <module> <domain> ...`` as a Ray job on the test stack, followed to the end: its exit code
    and the JSON object of its last line."""
    from infra import stack
    from pipelines.cli import job_entrypoint, submit_and_follow

    entrypoint = job_entrypoint(module, domain, model, None, overrides, extra)
    return submit_and_follow(entrypoint, stack.dashboard_url(), None)


def train_until_served(domain: str, model: str, overrides: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """Train ``domain``/``model`` as a Ray job, then wait until its service has loaded a model (it polls the
    registry alias every 2 s here)."""
    import httpx

    from infra import stack

    code, result = submit_job("pipelines.train", domain, model, overrides)
    assert code == 0 and result is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.post(stack.service_url(domain) + "/model", json={}, timeout=30).status_code == 200:
            break
        time.sleep(2)
    return result
