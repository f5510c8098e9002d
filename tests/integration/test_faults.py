"""Break the real stack and check what survives: MLflow down at a service's start and during a training job,
a service process killed and restarted by ``tessera up``, the Ray head restarted between two jobs.

Each test leaves the session's stack whole again (every component healthy) for the tests after it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import DOMAINS, eventually, submit_job, tiny, url, wait_until_served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SPARE_PORT = 23101  # a second forecasting service, started while MLflow is down


def _component(name: str) -> Any:
    from infra import stack

    return next(c for c in stack.components(DOMAINS) if c.name == name)


def _stop(name: str) -> None:
    """Stop one component of the session's stack (its process group), as a crash or an operator would."""
    from infra import stack

    component = _component(name)
    pid = component.pid()
    assert pid is not None, f"{name} is not running"
    stack._terminate([pid], grace=5.0)
    assert eventually(lambda: not component.healthy(timeout=1.0), timeout=30, every=0.5), f"{name} still answers"


def _restart_stack() -> float:
    """``tessera up`` on the session's stack: whatever is down is started again; seconds until all healthy."""
    from infra import stack

    started = time.monotonic()
    stack.up(DOMAINS, num_cpus=2, timeout=300)
    return time.monotonic() - started


def _forecast_ok() -> bool:
    from services.forecasting.client import example_request

    return httpx.post(url("forecasting"), json=example_request(), timeout=60).status_code == 200


def test_a_service_started_while_mlflow_is_down_says_why_in_seconds_and_serves_once_it_is_back(
        trained: Any, tmp_path: Path) -> None:
    from infra import stack

    trained("forecasting")
    # the production version now (earlier tests may have promoted a later one): the one a new service must load
    version = httpx.get(url("forecasting", "/model"), timeout=15).json()["version"]
    _stop("mlflow")
    spare = None
    try:
        assert _forecast_ok(), "a running service must keep serving the model it holds while MLflow is down"
        env = {**stack.child_env(), "TESSERA_RELOAD_SECONDS": "2"}
        log = open(tmp_path / "spare.log", "wb")  # noqa: SIM115 - the server's log while it runs
        spawned = time.monotonic()
        spare = subprocess.Popen([stack._bin("bentoml"), "serve", "services.forecasting.service:Forecasting",
                                  "--host", "127.0.0.1", "--port", str(SPARE_PORT)], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, cwd=stack.PROJECT_ROOT, start_new_session=True)
        base = f"http://127.0.0.1:{SPARE_PORT}"

        def model_answer() -> httpx.Response | None:
            try:
                return httpx.get(f"{base}/model", timeout=15)
            except httpx.TransportError:
                return None

        def says_why() -> httpx.Response | None:  # while BentoML starts, no answer yet
            response = model_answer()
            return response if response is not None and "registry unavailable" in response.text else None

        first = eventually(says_why, timeout=120, every=0.5)
        answered_after = time.monotonic() - spawned
        assert first is not None, (tmp_path / "spare.log").read_text()[-3000:]
        assert first.status_code == 503 and "registry unavailable" in first.json()["error"], first.text
        # BentoML's own start-up takes most of this; the MLflow client's default retries alone take ~4 minutes
        assert answered_after < 90, f"the first answer came {answered_after:.0f} s after the start"
        again = time.monotonic()
        response = model_answer()
        assert response is not None and response.status_code == 503 and time.monotonic() - again < 5

        restart = _restart_stack()
        served = eventually(lambda: (r := model_answer()) is not None and r.status_code == 200 and r.json(),
                            timeout=30, every=0.5)
        assert served and str(served["version"]) == str(version), served
        print(f"first answer (503) {answered_after:.1f} s after start; MLflow back in {restart:.1f} s; served "
              f"v{served['version']}")
    finally:
        if spare is not None:
            stack._terminate([spare.pid], grace=5.0)
        _restart_stack()


def _running_run(experiment: str, after_ms: int) -> Any:
    from shared.tracking import client

    try:
        found = client().search_experiments(filter_string=f"name = '{experiment}'")
        if not found:
            return None
        runs = client().search_runs([found[0].experiment_id], filter_string=f"attributes.start_time > {after_ms}")
    except Exception:  # MLflow is starting: try again
        return None
    return next((r for r in runs if r.info.status == "RUNNING"), None)


def test_a_training_job_outlives_an_mlflow_restart_and_loses_nothing(trained: Any) -> None:
    from shared.tracking import client

    trained("forecasting")
    experiment = "faults-mlflow-restart"
    epochs = 12
    outcome: dict[str, Any] = {}
    submitted_ms = int(time.time() * 1000)

    def job() -> None:
        outcome["code"], outcome["result"] = submit_job(
            "pipelines.train", "forecasting", "itransformer", [*tiny("forecasting"), f"epochs={epochs}"],
            ["--experiment", experiment])

    thread = threading.Thread(target=job)
    thread.start()
    run = eventually(lambda: _running_run(experiment, submitted_ms), timeout=240, every=0.5)
    assert run is not None, "the job's run did not start"
    _stop("mlflow")
    down_at = time.monotonic()
    time.sleep(5)  # the job logs its epochs into the outage
    _restart_stack()
    outage = time.monotonic() - down_at
    thread.join(600)
    assert not thread.is_alive() and outcome.get("code") == 0, outcome
    result = outcome["result"]
    print(f"MLflow down for {outage:.1f} s while run {run.info.run_id} trained; job result {result}")
    mlflow = client()
    assert result["run_id"] == run.info.run_id
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "val_mse")]
    assert sorted(set(steps)) == list(range(1, epochs + 1)), steps  # every epoch's metric is there
    version = mlflow.get_model_version("forecasting", str(result["version"]))
    assert version.run_id == run.info.run_id and version.status == "READY"
    wait_until_served("forecasting", result["version"], timeout=60)


def test_a_killed_service_restarted_by_tessera_up_serves_the_same_version(trained: Any) -> None:
    trained("forecasting")
    before = httpx.get(url("forecasting", "/model"), timeout=30).json()["version"]
    _stop("forecasting")
    restart = _restart_stack()
    served = wait_until_served("forecasting", before, timeout=120)
    assert str(served["version"]) == str(before) and _forecast_ok()
    print(f"forecasting killed; `tessera up` brought it back in {restart:.1f} s serving v{served['version']}")


def test_the_ray_head_restarted_between_two_jobs_loses_no_registered_model(trained: Any) -> None:
    from infra import stack
    from shared.tracking import client

    first = trained("forecasting")["version"]
    mlflow = client()
    before = {v.version for v in mlflow.search_model_versions("name = 'forecasting'")}
    stack.down([])  # MLflow and Ray, no service: Ray's head and workers go; MLflow's database stays on disk
    assert not _component("ray").healthy(timeout=1.0)
    _restart_stack()
    code, result = submit_job("pipelines.train", "forecasting", "itransformer", tiny("forecasting"))
    assert code == 0 and result is not None
    after = {v.version for v in client().search_model_versions("name = 'forecasting'")}
    assert before < after and str(result["version"]) in after and str(first) in after
    # the alias is where the promotion rule put it (the new version only when it validated better)
    production = client().get_model_version_by_alias("forecasting", "production").version
    assert (production == str(result["version"])) == bool(result["promoted"]) and production in after
    wait_until_served("forecasting", production, timeout=60)
