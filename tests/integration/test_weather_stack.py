"""weather on the real local stack: the Ray training job's run and calibration, ``POST /forecast`` (netCDF upload)
and ``/forecast_json`` over HTTP, bad inputs, and the evaluation pipeline with its scores and plots in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

GRID = (32, 64)  # the default synthetic grid, which the tiny model is trained on


def _url(route: str = "/forecast") -> str:
    from infra import stack

    return stack.service_url("weather") + route


def _state() -> Any:
    from services.weather.synthetic import synthetic_dataset

    ds = synthetic_dataset(days=1, grid=GRID, seed=0).isel(time=slice(5, 6))
    return ds.drop_vars(["lsm", "orography"])


def _json_state(ds: Any) -> dict[str, Any]:
    return {"time": "2000-01-01T05:00:00Z", "steps": 2,
            "fields": {"t_850": ds["t"].values[0, 0].tolist(), "t_500": ds["t"].values[0, 1].tolist(),
                       "t2m": ds["t2m"].values[0].tolist()}}


def _upload(content: bytes, **form: Any) -> httpx.Response:
    return httpx.post(_url(), files={"file": ("state.nc", content, "application/x-netcdf")},
                      data={k: str(v) for k, v in form.items()}, timeout=120)


@pytest.fixture(scope="module")
def weather_model(trained: object) -> dict:
    return trained("weather")  # type: ignore[operator,no-any-return]


def test_training_job_registers_wxformer_with_metrics_and_maps(weather_model: dict) -> None:
    from shared.tracking import client

    assert weather_model["promoted"] is True and weather_model["model"] == "wxformer"
    assert weather_model["test_wrmse"] > 0
    mlflow = client()
    metrics = mlflow.get_run(weather_model["run_id"]).data.metrics
    assert {"train_loss", "val_wrmse", "val_wrmse_step1", "test_wrmse", "test_wrmse_persistence_step1"} <= set(metrics)
    plots = {a.path for a in mlflow.list_artifacts(weather_model["run_id"], "plots")}
    assert {"plots/loss.png", "plots/forecast_vs_truth.png"} <= plots
    # damping and relaxation toward the climatology fitted on validation after training: logged, and saved
    # with the model (with the climatology itself) for the service
    folder = "model/artifacts/tessera_model"  # the Tessera model inside the MLflow model
    arrays = load_file(mlflow.download_artifacts(weather_model["run_id"], f"{folder}/state.safetensors"))
    meta = json.loads(Path(mlflow.download_artifacts(weather_model["run_id"], f"{folder}/state.json")).read_text())
    assert "calibrated_val_wrmse" in metrics
    assert arrays["climatology"].shape == (5, 3, *GRID)  # 2 harmonics, 3 channels, the grid: arrays, not JSON
    assert "climatology" not in meta and meta["channels"] == ["t_850", "t_500", "t2m"]
    for name in ("damping", "relaxation"):
        steps = [metrics[f"{name}_step{k}"] for k in (1, 2)]  # train_rollout 2 by default
        assert all(0.0 <= f <= 1.0 for f in steps)
        assert arrays[name].mean(dim=1).tolist() == pytest.approx(steps, rel=1e-5)


def test_netcdf_upload_returns_the_rollout_as_netcdf(weather_model: dict, tmp_path: Path) -> None:
    import xarray as xr

    response = _upload(bytes(_state().to_netcdf()), steps=3)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-netcdf"
    (tmp_path / "forecast.nc").write_bytes(response.content)
    out = xr.open_dataset(tmp_path / "forecast.nc").load()
    assert out["t"].dims == ("time", "level", "latitude", "longitude") and out["t2m"].shape == (3, *GRID)
    assert str(out.time.values[-1])[:16] == "2000-01-01T23:00" and out["t2m"].attrs["units"] == "K"
    assert np.isfinite(out["t2m"].values).all() and 200 < float(out["t2m"].mean()) < 320
    assert out.attrs["model"] == f"weather v{weather_model['version']}"
    summary = _upload(bytes(_state().to_netcdf()), steps=2, format="json")
    assert summary.status_code == 200, summary.text
    body = summary.json()
    assert body["lead_hours"] == [6, 12] and body["values"] is None
    assert body["summary"]["t2m"]["mean"][0] == pytest.approx(float((out["t2m"][0] * _weights()).mean()), abs=1e-3)


def _weights() -> np.ndarray:
    lat = np.deg2rad(_state().latitude.values)
    w = np.cos(lat)[:, None] * np.ones((1, GRID[1]))
    return w / w.mean()


def test_json_form_returns_values_and_summary(weather_model: dict) -> None:
    response = httpx.post(_url("/forecast_json"), json=_json_state(_state()), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["channels"] == ["t_850", "t_500", "t2m"] and body["times"][0].startswith("2000-01-01T11:00")
    assert np.asarray(body["values"]["t2m"]).shape == (2, *GRID)
    assert body["model"]["version"] == str(weather_model["version"])
    assert any("assumed K" in note for note in body["notes"])
    info = httpx.post(_url("/model"), json={}, timeout=30).json()
    assert info["step_hours"] == 6 and info["channels"] == ["t_850", "t_500", "t2m"]
    assert len(info["grid"]["latitude"]) == GRID[0]


def _bad_uploads() -> list[Any]:
    state = _state()
    celsius_wind = state.copy()
    celsius_wind["t2m"].attrs["units"] = "m s**-1"
    return [
        (bytes(state.isel(latitude=slice(0, 8)).to_netcdf()), {}, 422, f"grid is 8 x {GRID[1]}"),
        (bytes(state.drop_vars("t2m").to_netcdf()), {}, 422, "variable 't2m' is missing"),
        (bytes(celsius_wind.to_netcdf()), {}, 422, "do not match the model's 'K'"),
        (b"this is not netCDF", {}, 422, "could not read the upload"),
        (bytes(state.to_netcdf()), {"steps": 0}, 400, "greater than or equal to 1"),
        (bytes(state.to_netcdf()), {"steps": 1000}, 400, "less than or equal to 120"),
        (bytes(state.to_netcdf()), {"format": "grib"}, 400, "netcdf"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_uploads_are_a_4xx_with_the_reason(weather_model: dict, case: int) -> None:
    content, form, status, reason = _bad_uploads()[case]
    response = _upload(content, **form)
    assert response.status_code == status, response.text
    assert reason in response.text


@pytest.mark.parametrize(("change", "status", "reason"), [
    (lambda b: b["fields"].pop("t2m"), 422, "missing ['t2m']"),
    (lambda b: b["fields"]["t2m"].pop(), 422, f"expected {GRID[0]} rows"),
    (lambda b: b.update(units={"t2m": "Pa"}), 422, "units 'Pa'"),
    (lambda b: b.update(time="yesterday"), 400, "time"),
    (lambda b: b.update(extra=1), 400, "Extra inputs"),
])
def test_bad_json_is_a_4xx_with_the_reason(weather_model: dict, change: Any, status: int, reason: str) -> None:
    body = _json_state(_state())
    change(body)
    response = httpx.post(_url("/forecast_json"), json=body, timeout=60)
    assert response.status_code == status, response.text
    assert reason in response.text


def test_nan_and_oversized_bodies_are_refused(weather_model: dict) -> None:
    body = _json_state(_state())
    text = httpx.Request("POST", "/", json=body).content.decode().replace(str(body["fields"]["t2m"][0][0]), "NaN", 1)
    response = httpx.post(_url("/forecast_json"), content=text, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 400 and "finite" in response.text
    huge = _upload(b"\0" * (33 * 1024 * 1024))
    assert huge.status_code == 413 and "larger than" in huge.text


def test_evaluation_scores_model_and_baselines_per_lead(weather_model: dict) -> None:
    """The evaluation pipeline (in this process: weather's evaluation runs no Ray tasks) against the stack's
    registry: scores per lead, plots in MLflow, the version tagged with its evaluation run."""
    from pipelines.evaluate import run
    from shared.tracking import client

    result = run(["weather", "--set", "lead_steps=3"])
    assert result["version"] == weather_model["version"] and result["lead_hours"] == [6, 12, 18]
    for score in ("rmse", "acc"):
        # (6 synthetic days leave too short a validation period to fit the relaxed diurnal persistence)
        assert set(result[score]) == {"model", "model_raw", "persistence", "climatology", "diurnal_persistence"}
        assert all(len(v) == 3 for table in result[score].values() for v in table.values())
    assert set(result["rmse"]["model"]) == {"t_850", "t_500", "t2m"}
    assert set(result["rmse_ci95"]) == set(result["rmse"])
    assert "model_raw - persistence" in result["rmse_difference_ci95"]
    mlflow = client()
    artifacts = {a.path for a in mlflow.list_artifacts(result["run_id"], "plots")}
    assert {"plots/rmse_vs_lead.png", "plots/acc_vs_lead.png", "plots/maps.png"} <= artifacts
    metrics = mlflow.get_run(result["run_id"]).data.metrics
    assert "rmse.model.t2m_0" in metrics
    version = mlflow.get_model_version("weather", str(weather_model["version"]))
    assert version.tags["last_evaluation_run"] == result["run_id"]
