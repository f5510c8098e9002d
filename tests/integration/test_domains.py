"""Every registered domain on the real stack, the same way: a 503 saying how to train before any model, its tiny
model trained as a Ray job and served, its example request answered, ``/model``, bodies that fail before a
service's code runs refused with a 4xx, and each service fuzzed from its own OpenAPI document."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared import registry
from tests.integration.conftest import DOMAINS, url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FUZZ_EXAMPLES = 400  # generated test cases per operation and round (each service: its endpoint(s) and /model)
FUZZ_SECONDS = 40  # schemathesis repeats the fuzzing phase until this time is spent (12 s fell short of
# FUZZ_REQUESTS on 2 cores once a fifth service shared them: 849 and 994 requests in one CI run)
FUZZ_REQUESTS = 1000  # at least this many requests per service


def _example(name: str) -> tuple[str, dict]:
    domain = registry.get(name)
    return url(name, domain.example_path), domain.example_request()


@pytest.mark.parametrize("name", DOMAINS)
def test_before_any_model_the_endpoints_say_503_and_how_to_train(stack_env: dict[str, str], name: str) -> None:
    route, body = _example(name)
    for response in (httpx.post(route, json=body, timeout=30), httpx.post(url(name, "/model"), json={}, timeout=30),
                     httpx.get(url(name, "/model"), timeout=30)):
        assert response.status_code == 503, response.text
        assert f"tessera train {name}" in response.json()["error"]
    # alive, but not ready to serve: /livez answers, /readyz does not until a model is loaded
    assert httpx.get(url(name, "/livez"), timeout=30).status_code == 200
    assert httpx.get(url(name, "/readyz"), timeout=30).status_code == 503


@pytest.mark.parametrize("name", DOMAINS)
def test_the_tiny_model_trained_as_a_ray_job_answers_the_example_request(trained: object, name: str) -> None:
    result = trained(name)  # type: ignore[operator]
    assert result["promoted"] is True and result["version"] >= 1
    route, body = _example(name)
    response = httpx.post(route, json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"]["version"] == str(result["version"])
    info = httpx.get(url(name, "/model"), timeout=30).json()
    assert info == httpx.post(url(name, "/model"), json={}, timeout=30).json()  # GET, and BentoML's POST
    assert info["name"] == name and info["version"] == str(result["version"]) and info["run_id"] == result["run_id"]
    assert info["architecture"] == registry.get(name).models[0]
    assert httpx.get(url(name, "/readyz"), timeout=30).status_code == 200
    from infra.stack import service_url

    page = httpx.get(service_url(name) + "/docs.json", timeout=30).json()["info"]
    assert page["version"] == f"v{result['version']}" and f"now **v{result['version']}**" in page["description"]


@pytest.mark.parametrize("name", DOMAINS)
def test_bodies_that_fail_before_a_service_runs_are_refused_with_the_reason(trained: object, name: str) -> None:
    trained(name)  # type: ignore[operator]
    domain = registry.get(name)
    from infra.stack import service_url

    spec = httpx.get(service_url(name) + "/docs.json", timeout=30).json()
    routes = [path for path, methods in spec["paths"].items() if "post" in methods]
    assert domain.endpoint in routes and "/model" in routes
    for route in routes:
        media = next(iter(spec["paths"][route]["post"].get("requestBody", {}).get("content", {"application/json": 0})))
        cases = [({"content-type": "multipart/form-data"}, b"{}", 400 if media == "multipart/form-data" else 415),
                 ({"content-type": "application/vnd.bentoml+pickle"}, b"\x80\x04K\x01.", 415),
                 ({"content-type": "text/plain"}, b"hello", 415)]
        if media == "multipart/form-data":
            cases.append(({"content-type": "multipart/form-data; boundary=b"}, b"--b\r\n\r\nno headers\r\n--b--\r\n",
                          400))
        for headers, content, status in cases:
            response = httpx.post(url(name, route), headers=headers, content=content, timeout=30)
            assert response.status_code == status, (route, headers, response.text)
            assert response.json()["error"], response.text


@pytest.mark.parametrize("name", DOMAINS)
def test_fuzzing_each_service_from_its_own_openapi_document_finds_no_server_error(trained: object, name: str,
                                                                                  tmp_path: Path) -> None:
    """Schemathesis (coverage and fuzzing phases: mutations of the schema's example, then generated bodies,
    repeated for ``FUZZ_SECONDS``), at least 1,000 requests per service, failing on any 5xx; the served model is
    the tiny one, so the valid requests among them reach the model too."""
    trained(name)  # type: ignore[operator]
    from infra.stack import service_url

    base = service_url(name)
    har = tmp_path / "requests.har"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", f"{base}/docs.json", "--checks", "not_a_server_error",
         "--max-examples", str(FUZZ_EXAMPLES), "--max-time", str(FUZZ_SECONDS), "--seed", "20261201",
         "--generation-database", "none",
         "--request-timeout", "60", "--no-color", "--workers", "2", "--report", "har",
         "--report-har-path", str(har)],
        capture_output=True, text=True, timeout=840)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = [e["response"]["status"] for e in entries]
    assert len(entries) >= FUZZ_REQUESTS, f"{len(entries)} requests\n{output[-2000:]}"
    assert not [s for s in statuses if s >= 500], f"server errors: {sorted(set(statuses))}"
    assert not re.search(r"\b[1-9]\d* failures?\b", output), output[-3000:]


@pytest.mark.parametrize("name", DOMAINS)
def test_tessera_example_writes_an_input_that_tessera_predict_sends(trained: object, name: str, tmp_path: Path) -> None:
    import os

    result = trained(name)  # type: ignore[operator]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                              timeout=300, env=os.environ.copy())

    made = cli("example", name, "-o", str(tmp_path / "in"))
    assert made.returncode == 0, made.stderr
    (source,) = (tmp_path / "in").iterdir()
    answer = tmp_path / "answer"
    done = cli("predict", name, str(source), "-o", str(answer))
    assert done.returncode == 0, done.stderr
    assert f"model {name} v{result['version']}" in done.stderr and answer.stat().st_size > 0
    refused = cli("predict", name, str(tmp_path / "missing.file"))
    assert refused.returncode == 2 and "missing.file" in refused.stderr


@pytest.mark.parametrize("name", DOMAINS)
def test_the_production_model_is_an_mlflow_model_and_a_bentoml_one(trained: object, name: str,
                                                                   tmp_path: Path) -> None:
    """``mlflow.pyfunc.load_model`` on the registry's production version answers its input example (the same
    version the BentoML service answers with), and ``bentoml.mlflow.import_model`` takes it."""
    import os

    import mlflow.pyfunc

    result = trained(name)  # type: ignore[operator]
    served = httpx.post(url(name, "/model"), json={}, timeout=30).json()["version"]
    model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    example = model.input_example
    answer = model.predict(example[0], params=example[1]) if isinstance(example, tuple) else model.predict(example)
    assert len(answer) >= 1 and model.metadata.signature is not None
    assert model.metadata.metadata["tessera_domain"] == name and served == str(result["version"])
    code = ("import bentoml, sys; m = bentoml.mlflow.import_model(sys.argv[1], sys.argv[2]); "
            "print(m.tag, bentoml.mlflow.load_model(m).metadata.metadata['tessera_domain'])")
    done = subprocess.run([sys.executable, "-c", code, f"tessera-{name.replace('_', '-')}",
                           f"models:/{name}/{served}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(name)


@pytest.mark.parametrize("name", DOMAINS)
def test_bentoml_python_client_answers_the_example(trained: object, name: str) -> None:
    """The documented Python client: ``bentoml.SyncHTTPClient`` on the service, its endpoint called by name with
    the example request."""
    import bentoml

    from infra.stack import service_url
    from tests.contract import service_of

    result = trained(name)  # type: ignore[operator]
    domain = registry.get(name)
    route = domain.example_path
    api = next(a.name for a in service_of(domain).apis.values() if a.route == route)
    with bentoml.SyncHTTPClient(service_url(name), timeout=60) as client:
        answer = getattr(client, api)(domain.example_request())
    answer = answer if isinstance(answer, dict) else answer.model_dump()
    assert str(answer["model"]["version"]) == str(result["version"])
