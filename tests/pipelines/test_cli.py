"""``tessera``'s checks and messages that need no running stack: settings and arguments refused before any code
is uploaded, one-line errors when Ray or MLflow do not answer, the registry commands on a SQLite MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import registry

ROOT = Path(__file__).resolve().parents[2]
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing answers


def tessera(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "COLUMNS": "250", **(env or {})})


@pytest.mark.parametrize(("args", "reason"), [
    (["train", "forecasting", "--set", "nope=1"], "unknown setting 'nope'"),
    (["train", "forecasting", "--set", "epochs=0"], "epochs=0: must be >= 1"),
    (["train", "forecasting", "--model", "lstm"], "unknown model 'lstm'"),
    (["evaluate", "forecasting"], "forecasting has no evaluation pipeline"),
    (["evaluate", "robot_policy", "--set", "episodes=-1"], "episodes=-1: must be >= 1"),
    (["evaluate", "robot_policy", "--promote"], "--promote needs --version"),
    (["train", "astrology"], "unknown domain 'astrology'"),
])
def test_bad_jobs_are_refused_on_the_client_before_anything_is_submitted(args: list[str], reason: str) -> None:
    done = tessera(*args, "--address", NOWHERE)  # would fail to connect if it got that far
    assert done.returncode == 2, done.stderr
    assert reason in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_ray_or_mlflow_is_one_line_that_says_what_to_do() -> None:
    done = tessera("train", "forecasting", "--address", NOWHERE)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"cannot submit to Ray at {NOWHERE}" in done.stderr and "tessera up" in done.stderr
    started = time.monotonic()
    done = tessera("models", "forecasting", "--tracking-uri", NOWHERE)
    assert done.returncode == 1 and f"MLflow is not reachable at {NOWHERE}" in done.stderr
    assert time.monotonic() - started < 30  # not minutes of client retries
    job = subprocess.run([sys.executable, "-m", "pipelines.train", "forecasting", "--no-ray"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": NOWHERE})
    assert job.returncode == 2 and "MLflow is not reachable" in job.stderr and "tessera up" in job.stderr


def test_data_that_is_not_there_is_refused_on_the_client_when_the_job_runs_here() -> None:
    # the local stack's default address (not the integration stack's ports, which the session may have set)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.endswith("_PORT")}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "forecasting", "--data",
                           "/nonexistent/ETTh1.csv"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**env, "COLUMNS": "250"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--data /nonexistent/ETTh1.csv: no such file or folder on this machine" in done.stderr
    # another cluster may have it (the compose stack mounts /data on every node): a note, then the submission
    remote = tessera("train", "forecasting", "--data", "/data/ETTh1.csv", "--address", NOWHERE)
    assert "/data/ETTh1.csv is not on this machine; the job reads it on the cluster" in remote.stderr
    assert remote.returncode == 1 and f"cannot submit to Ray at {NOWHERE}" in remote.stderr


def test_settings_lists_every_setting_with_its_default_and_comment() -> None:
    done = tessera("settings", "weather")
    assert done.returncode == 0, done.stderr
    for name in ("batch_size", "grad_clip", "ray_workers", "residual_base", "dims"):
        assert name in done.stdout
    assert "global batch per optimizer step" in done.stdout
    autoformer = tessera("settings", "forecasting", "--model", "autoformer")
    assert "moving_avg" in autoformer.stdout and "24" in autoformer.stdout  # the published preset's default
    assert "seed_start" in tessera("settings", "robot_policy", "--evaluation").stdout


def test_models_promote_and_rollback_on_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.train import run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(registry.DOMAIN_PACKAGES_ENV, "tests.fixtures.toy_domain")
    first = run(["toy", "--no-ray", "--set", "samples=256", "epochs=2", "cpus_per_worker=1"])
    other = run(["toy", "--no-ray", "--set", "samples=128", "epochs=2", "cpus_per_worker=1"])  # other data
    assert first["promoted"] and not other["promoted"] and "tessera promote toy 2" in other["promotion"]
    env = {registry.DOMAIN_PACKAGES_ENV: "tests.fixtures.toy_domain"}
    listed = tessera("models", "toy", "--tracking-uri", uri, env=env)
    assert listed.returncode == 0 and "@production" in listed.stdout and "toy-128x4-0" in listed.stdout
    promoted = tessera("promote", "toy", "2", "--tracking-uri", uri, env=env)
    assert promoted.returncode == 0 and "v1 -> v2" in promoted.stderr
    back = tessera("rollback", "toy", "--tracking-uri", uri, env=env)
    assert back.returncode == 0 and "v2 -> v1" in back.stderr
    again = tessera("rollback", "toy", "--tracking-uri", uri, env=env)
    assert again.returncode == 2 and "first version" in again.stderr
    assert tessera("promote", "toy", "7", "--tracking-uri", uri, env=env).returncode == 2
