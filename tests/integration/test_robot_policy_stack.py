"""robot_policy on the real local stack: the Ray training job's run, ``POST /act`` over HTTP, an evaluation Ray job
whose rollouts run as Ray tasks, and ranking versions on closed-loop coverage (``evaluate --promote``)."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.integration.conftest import submit_job, tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

HISTORY = [[200.0, 300.0, 250.0, 260.0, 0.5], [205.0, 298.0, 250.0, 260.0, 0.5]]


def _url(route: str = "/act") -> str:
    from infra import stack

    return stack.service_url("robot_policy") + route


@pytest.fixture(scope="module")
def policy_model(trained: object) -> dict:
    return trained("robot_policy")  # type: ignore[operator,no-any-return]


def test_training_job_registers_the_policy_with_its_plots(policy_model: dict) -> None:
    from shared.tracking import client

    assert policy_model["promoted"] is True and policy_model["model"] == "ebt"
    assert policy_model["test_action_mse"] > 0
    mlflow = client()
    metrics = mlflow.get_run(policy_model["run_id"]).data.metrics
    assert {"train_loss", "val_action_mse", "val_final_energy", "test_action_mse"} <= set(metrics)
    plots = {a.path for a in mlflow.list_artifacts(policy_model["run_id"], "plots")}
    assert {"plots/loss.png", "plots/chunks_vs_demonstrations.png"} <= plots


def test_act_returns_a_chunk_its_energy_and_the_steps_used(policy_model: dict) -> None:
    response = httpx.post(_url(), json={"observations": HISTORY, "seed": 3}, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["actions"]) == 16 and all(len(a) == 2 for a in answer["actions"])
    assert all(0.0 <= v <= 512.0 for a in answer["actions"] for v in a)
    assert answer["execute"] == 8 and 1 <= answer["descent_steps"] <= 4
    assert math.isfinite(answer["energy"])
    assert answer["model"]["version"] == str(policy_model["version"])
    # same seed, same answer; a warm start and a step budget are honoured
    again = httpx.post(_url(), json={"observations": HISTORY, "seed": 3}, timeout=30).json()
    assert again["actions"] == answer["actions"]
    warm = httpx.post(_url(), json={"observations": HISTORY, "previous_actions": answer["actions"],
                                    "descent_steps": 2, "candidates": 1}, timeout=30)
    assert warm.status_code == 200, warm.text
    assert warm.json()["descent_steps"] <= 2
    info = httpx.post(_url("/model"), json={}, timeout=30).json()
    assert info["obs_horizon"] == 2 and info["action_horizon"] == 16


def test_concurrent_requests_get_the_plans_they_get_alone(policy_model: dict) -> None:
    """Requests sent at once are planned together (the service batches them): each still gets its own seed's
    plan, as when it was sent alone."""
    bodies = [{"observations": [[200.0 + 10 * k, 300.0, 250.0, 260.0, 0.5], [205.0 + 10 * k, 298.0, 250.0, 260.0,
                                                                          0.5]], "seed": k} for k in range(12)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: httpx.post(_url(), json=body, timeout=60), bodies))
    for body, response in zip(bodies, together, strict=True):
        assert response.status_code == 200, response.text
        alone = httpx.post(_url(), json=body, timeout=30).json()
        np.testing.assert_allclose(response.json()["actions"], alone["actions"], atol=0.01)
        assert response.json()["descent_steps"] == alone["descent_steps"]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"observations": [HISTORY[0]]}, 422, "expected 2 rows"),
        ({"observations": [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]}, 422, "expected 5 values"),
        ({"observations": [[900.0, 300.0, 250.0, 260.0, 0.5], HISTORY[1]]}, 422, "outside the workspace"),
        ({"observations": [[float("nan")] * 5, HISTORY[1]]}, 400, "finite"),
        ({"observations": HISTORY, "previous_actions": [[1.0, 2.0]] * 3}, 422, "expected 16 rows"),
        ({"observations": HISTORY, "descent_steps": 0}, 400, "greater than or equal to 1"),
        ({"observations": HISTORY, "speed": 2}, 400, "Extra inputs"),
        ({"observations": "left"}, 400, "valid array"),
    ],
)
def test_bad_input_is_a_4xx_with_the_reason(policy_model: dict, body: dict, status: int, reason: str) -> None:
    response = httpx.post(_url(), content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    assert reason in response.text


def test_evaluation_job_rolls_out_episodes_and_logs_gif_and_plots(policy_model: dict) -> None:
    from shared.tracking import client

    code, result = submit_job("pipelines.evaluate", "robot_policy", None,
                              ["episodes=2", "max_steps=24", "gif_episodes=1", "ood_samples=32", "workers=2"])
    assert code == 0 and result is not None
    assert result["version"] == policy_model["version"] and result["episodes"] == 2
    assert 0.0 <= result["success_rate"] <= 1.0 and 0.0 <= result["mean_max_coverage"] <= 1.0
    assert 1 <= result["descent_steps"] <= 4 and result["latency_ms_per_chunk"] > 0
    assert 0.0 <= result["energy_ood_auroc"] <= 1.0
    mlflow = client()
    artifacts = {a.path for a in mlflow.list_artifacts(result["run_id"], "plots")}
    assert {"plots/energy_vs_step.png", "plots/energy_ood.png"} <= artifacts
    assert "files/rollouts.gif" in {a.path for a in mlflow.list_artifacts(result["run_id"], "files")}
    version = mlflow.get_model_version("robot_policy", str(policy_model["version"]))
    assert version.tags["last_evaluation_run"] == result["run_id"]


def test_evaluate_promote_ranks_versions_on_closed_loop_coverage(policy_model: dict) -> None:
    """A second version is promoted only if its coverage beats production's, measured with the same settings;
    production, not yet scored with them, is evaluated in the same job. (In this process, against the stack's
    registry: the Ray job path is the evaluation test above.)"""
    from pipelines.evaluate import run as evaluate
    from pipelines.train import run as train
    from shared.tracking import client

    second = train(["robot_policy", "--no-ray", "--set", *tiny("robot_policy"), "seed=5"])
    mlflow = client()
    mlflow.set_registered_model_alias("robot_policy", "production", str(policy_model["version"]))
    settings = ["episodes=2", "max_steps=16", "gif_episodes=0", "ood_samples=16", "workers=1"]  # not used for v1
    result = evaluate(["robot_policy", "--set", *settings, "--version", str(second["version"]), "--promote"])
    assert result["version"] == second["version"]
    first = mlflow.get_model_version("robot_policy", str(policy_model["version"])).tags
    new = mlflow.get_model_version("robot_policy", str(second["version"])).tags
    assert first["score_signature"] == new["score_signature"]  # production was scored with the same settings
    assert float(new["score_mean_max_reward"]) == pytest.approx(result["mean_max_reward"], abs=1e-6)
    beats = float(new["score_mean_max_reward"]) > float(first["score_mean_max_reward"])
    assert result["promoted"] is beats, result["promotion"]
    holder = mlflow.get_model_version_by_alias("robot_policy", "production").version
    assert holder == str(second["version"] if beats else policy_model["version"])
    assert f"production v{policy_model['version']}" in result["promotion"]

    result = evaluate(["robot_policy", "--set", *settings, "--version", holder, "--promote"])
    assert result["promoted"] is False and result["promotion"] == f"v{holder} already holds @production"


def test_mlflow_models_serve_answers_the_registered_policy(policy_model: dict, tmp_path: object) -> None:
    """The registered version served by MLflow's own scoring server (``mlflow models serve``), in this
    environment, answering its saved serving example: the model is a plain MLflow model."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from shared.tracking import client

    venv = str(Path(sys.executable).parent)
    server = subprocess.Popen(
        [f"{venv}/mlflow", "models", "serve", "-m", f"models:/robot_policy/{policy_model['version']}",
         "--env-manager", "local", "-p", "23099", "--host", "127.0.0.1"],
        env={**os.environ, "PATH": f"{venv}:{os.environ.get('PATH', '')}"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:23099/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        folder = Path(client().download_artifacts(policy_model["run_id"], "model/serving_input_example.json"))
        body = json.loads(folder.read_text())
        answer = httpx.post("http://127.0.0.1:23099/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["predictions"][0]
        assert {"action0_x", "action15_y", "energy"} <= set(prediction)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_tessera_bento_builds_a_bento_that_serves_its_version_without_the_registry(policy_model: dict,
                                                                                  tmp_path: object) -> None:
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "BENTOML_HOME": str(Path(str(tmp_path)) / "bentoml")}
    built = subprocess.run([sys.executable, "-m", "pipelines.cli", "bento", "robot_policy", "--version",
                            str(policy_model["version"])], capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1]
    assert tag.startswith("robot-policy:")
    venv = str(Path(sys.executable).parent)
    server = subprocess.Popen([f"{venv}/bentoml", "serve", tag, "-p", "23098", "--host", "127.0.0.1"],
                              env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},  # no registry at all
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:23098/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        answer = httpx.post("http://127.0.0.1:23098/act", json={"observations": HISTORY, "seed": 3}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["version"] == str(policy_model["version"])
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
