"""One real local stack (Ray head, MLflow server, every domain's BentoML service) for the integration tests.

It runs on ports of its own (so a developer's running stack is untouched) with its state in a temp folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
