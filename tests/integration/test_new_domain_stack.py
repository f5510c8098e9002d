"""A sixth domain with no edit outside its folder, on the real stack: the toy domain (copied into a package
outside this repository, found through ``TESSERA_DOMAIN_PACKAGES``) trains with the pipeline's own entry point
and registers in the stack's MLflow, ``tessera up`` starts its BentoML service, and it answers over HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from shared import registry
from tests.integration.conftest import SMOKE, overrides, restore_environ, wait_until_served
from tests.test_new_domain import install_toy_package

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PORT = 23009


@pytest.fixture(scope="module")
def toy_stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import importlib

    from infra import stack

    root = tmp_path_factory.mktemp("extra-domains")
    package = install_toy_package(root)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", registry.DOMAIN_PACKAGES_ENV, "TESSERA_TOY_PORT")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), saved["PYTHONPATH"]) if p)
    os.environ[registry.DOMAIN_PACKAGES_ENV] = package
    os.environ["TESSERA_TOY_PORT"] = str(PORT)
    import sys

    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        stack.up(["toy"], timeout=180)
        yield package
    finally:
        stack.stop_services(["toy"])  # the rest of the test stack keeps running
        sys.path.remove(str(root))
        registry.forget(package)
        restore_environ(saved)


def test_a_domain_outside_services_trains_registers_and_is_served(toy_stack: str) -> None:
    from infra import stack
    from pipelines.train import run
    from shared.tracking import client

    base = stack.service_url("toy")
    assert base.endswith(str(PORT)) and "toy" in {r["component"] for r in stack.status(["toy"])}
    before = httpx.post(f"{base}/predict", json=registry.get("toy").example_request(), timeout=30)
    assert before.status_code == 503 and "tessera train toy" in before.json()["error"]

    result = run(["toy", "--no-ray", "--set", *overrides(registry.get("toy").tiny), *SMOKE])
    assert result["promoted"] is True and result["test_mse"] < 1.0
    assert client().get_model_version_by_alias("toy", "production").version == str(result["version"])
    info = wait_until_served("toy", result["version"])
    assert info["features"] == 4 and info["architecture"] == "linear"

    answer = httpx.post(f"{base}/predict", json={"rows": [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]]}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"]["version"] == str(result["version"]) and len(body["predictions"]) == 2
    # y = x . (0.5, 1, 1.5, 2): 0.25 - 1 + 3 = 2.25 and 5.0, learned to within a few tenths
    assert body["predictions"] == pytest.approx([2.25, 5.0], abs=0.5)
    bad = httpx.post(f"{base}/predict", json={"rows": [[1.0, 2.0]]}, timeout=30)
    assert bad.status_code == 422 and "the model takes 4" in bad.json()["error"]
    wrong_type = httpx.post(f"{base}/predict", content=b"rows", headers={"content-type": "text/plain"}, timeout=30)
    assert wrong_type.status_code == 415

