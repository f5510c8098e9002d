"""forecasting on the real local stack: the Ray training job's run and registered model, forecasts over HTTP
in the data's units, bad input, a killed Ray Train worker resuming from its checkpoint, hot reload of a newly
promoted version, and ``tessera predict`` for CSV users.

Runs on ports of its own (so a developer's running stack is untouched) with its state in a temp folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from shared import registry
from tests.integration.conftest import DOMAINS, submit_job, tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SERIES_STEPS = registry.get("forecasting").tiny["synthetic_steps"]  # the series the tiny model trains on


HELD_OUT = 12  # the last rows of the synthetic series are kept back as the truth to compare with


def _body(rows: int = 60) -> dict:
    from services.forecasting.data import request_body, synthetic_frame

    return request_body(synthetic_frame(SERIES_STEPS, 7).iloc[-rows - HELD_OUT : -HELD_OUT])


def _forecast_url() -> str:
    from infra import stack

    return stack.service_url("forecasting") + "/forecast"


def _train(extra: list[str] | None = None, args: list[str] | None = None) -> tuple[int, dict | None]:
    return submit_job("pipelines.train", "forecasting", "itransformer", tiny("forecasting") + (extra or []), args)


def test_status_reports_every_component(stack_env: dict[str, str]) -> None:
    from infra import stack

    rows = {r["component"]: r for r in stack.status()}
    assert set(rows) == {"mlflow", "ray", *DOMAINS}
    assert all(r["healthy"] for r in rows.values()), rows


@pytest.fixture(scope="module")
def first_model(trained: object) -> dict:
    return trained("forecasting")  # type: ignore[operator,no-any-return]


def test_ray_job_trains_registers_and_service_answers(first_model: dict) -> None:
    from shared.tracking import client, production_version

    result = first_model
    assert result["version"] == 1 and result["promoted"] is True
    assert result["test_mse"] > 0 and result["test_mae"] > 0

    mlflow = client()
    assert production_version(mlflow, "forecasting").version == "1"
    run = mlflow.get_run(result["run_id"])
    assert {"train_loss", "val_mse", "test_mse", "test_mae"} <= set(run.data.metrics)
    assert len(mlflow.get_metric_history(result["run_id"], "val_mse")) == 2  # one point per epoch
    artifacts = {a.path for a in mlflow.list_artifacts(result["run_id"], "model")}
    assert {"model/MLmodel", "model/requirements.txt", "model/artifacts"} <= artifacts
    plots = {a.path for a in mlflow.list_artifacts(result["run_id"], "plots")}
    assert "plots/forecast_vs_truth.png" in plots

    deadline, response = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        response = httpx.post(_forecast_url(), json={**_body(), "horizon": 12}, timeout=30)
        if response.status_code == 200:
            break
        time.sleep(2)
    assert response is not None and response.status_code == 200, response and response.text
    answer = response.json()
    assert answer["model"]["version"] == "1" and answer["model"]["run_id"] == result["run_id"]
    assert len(answer["values"]) == 12 and all(len(row) == 7 for row in answer["values"])
    assert answer["timestamps"][0] == "2020-03-03T00:00:00"  # the hour after the last input row
    # Forecasts come back in the data's units: closer to the held-out truth than the series' own spread.
    import numpy as np

    from services.forecasting.data import synthetic_frame

    truth = synthetic_frame(SERIES_STEPS, 7).drop(columns="date").to_numpy()[-HELD_OUT:]
    error = np.abs(np.asarray(answer["values"]) - truth).mean()
    assert error < truth.std(), (error, truth.std())


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"values": [[float("inf")] * 7] * 60}, 400, "finite"),
        ({"columns": ["a", "b", "c", "d", "e", "f", "g"]}, 422, "columns must be"),
        ({"horizon": 500}, 422, "above the trained horizon"),
        ({"values": [[1.0] * 7] * 5, "timestamps": None}, 422, "needs at least"),
        ({"values": "not a table"}, 400, "valid array"),
        ({"unexpected": 1}, 400, "Extra inputs"),
        ({"timestamps": None}, 422, "send 'timestamps'"),
    ],
)
def test_bad_input_is_a_4xx_with_the_reason(first_model: dict, change: dict, status: int, reason: str) -> None:
    body = {k: v for k, v in {**_body(), **change}.items() if v is not None}
    response = httpx.post(_forecast_url(), content=json.dumps(body), headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    assert reason in response.text


def test_oversized_body_is_refused_with_413(stack_env: dict[str, str]) -> None:
    response = httpx.post(_forecast_url(), content=b"[" + b"0," * 5_000_000 + b"0]",
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "larger than" in response.text


def test_two_workers_survive_a_killed_worker_and_the_new_version_is_served(
        first_model: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two Ray Train workers: the global batch split between them, a worker killed in epoch 2 and the group
    resumed from epoch 1's checkpoint, validation sharded over them that adds up to scoring the whole split,
    and hot reload of the version it registers."""
    import torch
    from torch.utils.data import DataLoader

    from shared.tracking import client, load_registered

    os.environ["TESSERA_FAIL_ONCE_AT_EPOCH"] = f"1:{tmp_path / 'failed-once'}"
    try:
        code, result = _train(["ray_workers=2", "seed=7"])
    finally:
        os.environ.pop("TESSERA_FAIL_ONCE_AT_EPOCH")
    assert (tmp_path / "failed-once").exists(), "the fault was not injected"
    assert code == 0 and result is not None and result["epochs_run"] == 2
    log = capsys.readouterr().out
    assert "2 worker(s) on cpu; batch 16 = 2 worker(s) x 1 step(s) x 8" in log and "resumed from checkpoint" in log
    mlflow = client()
    history = mlflow.get_metric_history(result["run_id"], "val_mse")
    assert [m.step for m in history] == [1, 2]  # epoch 1 was not redone after the restart
    # The best epoch survives the restart: the registered weights and their validation tag are the best epoch's.
    best = min(history, key=lambda m: m.value)
    assert result["kept_epoch"] == best.step and result["kept_val_mse"] == pytest.approx(best.value)
    tags = mlflow.get_model_version("forecasting", str(result["version"])).tags
    assert float(tags["val_mse"]) == pytest.approx(best.value, abs=1e-5)
    # that epoch's validation ran sharded over the two workers: it equals scoring its weights on the whole split
    loaded = load_registered("forecasting", version_number=result["version"])
    assert loaded is not None
    domain = registry.get("forecasting")
    with torch.inference_mode():
        val = domain.evaluate(loaded.model, DataLoader(domain.load_data(loaded.cfg).val, batch_size=32),
                              torch.device("cpu"))
    assert val["mse"] == pytest.approx(result["kept_val_mse"], rel=1e-5)

    # Promote the new version by hand; the running service must switch to it without a restart.
    mlflow.set_registered_model_alias("forecasting", "production", str(result["version"]))
    deadline, served = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        response = httpx.post(_forecast_url(), json=_body(), timeout=30)
        served = response.json()["model"]["version"] if response.status_code == 200 else None
        if served == str(result["version"]):
            break
        time.sleep(2)
    assert served == str(result["version"])


def test_tessera_predict_wraps_the_call_for_csv_users(first_model: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    import pandas as pd

    from services.forecasting.data import synthetic_frame

    history = tmp_path / "history.csv"
    synthetic_frame(SERIES_STEPS, 7).iloc[-60 - HELD_OUT : -HELD_OUT].to_csv(history, index=False)
    out = tmp_path / "forecast.csv"
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "forecasting", str(history),
                           "--horizon", "6", "-o", str(out)], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    forecast = pd.read_csv(out)
    assert list(forecast.columns) == ["date", "v0", "v1", "v2", "v3", "v4", "v5", "v6"]
    assert len(forecast) == 6 and forecast["date"].iloc[0] == "2020-03-03T00:00:00"
    assert "model forecasting v" in done.stderr
