"""transients on the real local stack: the Ray training job's run and plots, ``POST /classify`` and a table upload
over HTTP with adaptive batching across concurrent requests, every bad object a 4xx naming it, and the
evaluation as a Ray job with the feature baseline beside the model."""

from __future__ import annotations

import concurrent.futures
import io
import json
import math

import httpx
import pandas as pd
import pytest

from services.transients.client import _object
from services.transients.data import synthetic_curves
from tests.integration.conftest import submit_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _url(route: str = "/classify") -> str:
    from infra import stack

    return stack.service_url("transients") + route


@pytest.fixture(scope="module")
def classifier(trained: object) -> dict:
    return trained("transients")  # type: ignore[operator,no-any-return]


def _objects(n: int, seed: int = 7) -> list[dict]:
    curves, _, _ = synthetic_curves(n, seed=seed)
    return [_object(c) for c in curves]


def test_training_job_registers_the_classifier_with_its_calibration_and_plots(classifier: dict) -> None:
    from shared.tracking import client

    mlflow = client()
    metrics = mlflow.get_run(classifier["run_id"]).data.metrics
    assert {"train_loss", "val_log_loss", "temperature", "test_log_loss", "test_balanced_accuracy"} <= set(metrics)
    plots = {a.path for a in mlflow.list_artifacts(classifier["run_id"], "plots")}
    assert {"plots/loss.png", "plots/confusion_test.png", "plots/reliability_test.png"} <= plots
    info = httpx.get(_url("/model"), timeout=30).json()
    assert info["temperature"] == pytest.approx(metrics["temperature"]) and info["bands"] == ["g", "r"]


def test_classify_answers_each_object_with_calibrated_probabilities(classifier: dict) -> None:
    objects = _objects(5)
    answer = httpx.post(_url(), json={"objects": objects}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    bias = httpx.get(_url("/model"), timeout=30).json()["decision_bias"]  # the balanced decision rule's
    assert [o["object_id"] for o in body["objects"]] == [o["object_id"] for o in objects]
    for row in body["objects"]:
        p = row["probabilities"]
        assert set(p) == set(body["classes"]) == set(bias)
        assert math.isclose(sum(p.values()), 1.0, abs_tol=1e-4)
        assert row["most_probable_class"] == max(p, key=p.get)
        assert row["top_class"] == max(p, key=lambda c: math.log(max(p[c], 1e-300)) + bias[c])
        assert row["top_probability"] == pytest.approx(p[row["top_class"]])
        assert math.isfinite(row["ood_score"]) and isinstance(row["out_of_distribution"], bool)
    assert body["model"]["version"] == str(classifier["version"])
    # the same object alone and in a batch of others gets the same answer
    alone = httpx.post(_url(), json={"objects": objects[2:3]}, timeout=60).json()["objects"][0]
    assert alone["probabilities"] == pytest.approx(body["objects"][2]["probabilities"], abs=1e-5)


def test_concurrent_requests_are_all_answered(classifier: dict) -> None:
    objects = _objects(32, seed=8)

    def send(i: int) -> int:
        return httpx.post(_url(), json={"objects": [objects[i]]}, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(send, range(32))) == [200] * 32


def test_a_table_upload_in_the_plasticc_columns_is_classified(classifier: dict) -> None:
    rows = [{"object_id": o["object_id"], "mjd": t, "passband": b, "flux": f, "flux_err": e}
            for o in _objects(3, seed=9) for t, b, f, e in zip(o["mjd"], o["passband"], o["flux"], o["flux_err"],
                                                                 strict=True)]
    csv = pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(index=False).encode()  # rows in any order
    answer = httpx.post(_url("/classify_table"), files={"file": ("lc.csv", csv, "text/csv")}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["objects"]) == 3
    parquet = io.BytesIO()
    pd.DataFrame(rows).to_parquet(parquet)
    answer = httpx.post(_url("/classify_table"), files={"file": ("lc.parquet", parquet.getvalue())}, timeout=60)
    assert answer.status_code == 200, answer.text
    bad = httpx.post(_url("/classify_table"), files={"file": ("lc.csv", b"a,b\n1,2\n", "text/csv")}, timeout=60)
    assert bad.status_code == 422 and "no column(s)" in bad.json()["error"]


@pytest.mark.parametrize(("change", "status", "reason"), [
    ({"passband": "u"}, 422, "is not a band of the model"),
    ({"flux_err": -1.0}, 422, "errors must be > 0"),
    ({"flux": float("nan")}, 422, "is not a finite number"),
    ({"drop_flux": True}, 422, "arrays of different lengths"),
    ({"empty": True}, 422, "no observations"),
    ({"points": 5000}, 422, "at most 1024 per object"),
])
def test_each_bad_object_is_a_4xx_naming_it(classifier: dict, change: dict, status: int, reason: str) -> None:
    objects = _objects(2, seed=10)
    bad = objects[1]
    if "passband" in change:
        bad["passband"][0] = change["passband"]
    if "flux_err" in change:
        bad["flux_err"][1] = change["flux_err"]
    if "flux" in change:
        bad["flux"][0] = change["flux"]
    if "drop_flux" in change:
        bad["flux"] = bad["flux"][:-1]
    if "empty" in change:
        bad.update(mjd=[], passband=[], flux=[], flux_err=[])
    if "points" in change:
        n = change["points"]
        bad.update(mjd=[float(i) for i in range(n)], passband=[0] * n, flux=[1.0] * n, flux_err=[0.1] * n)
    body = json.dumps({"objects": objects}, allow_nan=True)
    answer = httpx.post(_url(), content=body, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == status, answer.text
    assert f"objects[1] ({bad['object_id']})" in answer.json()["error"] and reason in answer.json()["error"]


def test_too_many_objects_and_too_large_bodies_are_refused(classifier: dict) -> None:
    many = httpx.post(_url(), json={"objects": _objects(1) * 257}, timeout=60)
    assert many.status_code == 400 and "at most 256 items" in many.text, many.text  # pydantic, through BentoML
    huge = httpx.post(_url(), content=b"{" + b" " * (5 * 1024 * 1024) + b"}",
                      headers={"content-type": "application/json"}, timeout=60)
    assert huge.status_code == 413


def test_the_evaluation_job_scores_the_model_beside_the_feature_baseline(classifier: dict) -> None:
    code, result = submit_job("pipelines.evaluate", "transients", None, ["early=[3,5]"])
    assert code == 0 and result is not None
    for system in ("model", "baseline"):
        assert set(result[system]["early"]) == {"3", "5"} and 0.0 <= result[system]["macro_auc"] <= 1.0
    assert result["version"] == classifier["version"] and result["classes"]
