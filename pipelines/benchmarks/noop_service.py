"""A BentoML service that does no work: one endpoint per domain's JSON route, with that route's own request
and response schemas (the same pydantic parsing and validation, the same answer size), answering a fixed
answer recorded from the real service. ``pipelines.benchmarks.load`` puts the same load on it and on the real
endpoint in one run: the gap is what the model and Tessera's own code cost on top of BentoML's serving.

    TESSERA_NOOP_ANSWERS=answers.json bentoml serve pipelines.benchmarks.noop_service:NoOp --port 3999

``answers.json`` maps a route (``/forecast``) to the JSON answer to return; routes it does not name are not
served.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import bentoml

from shared import registry
from shared.serving import BENTO_MAX_CONCURRENCY, settle_heap

ANSWERS_ENV = "TESSERA_NOOP_ANSWERS"


def json_api(domain: str) -> Any:
    """The BentoML API object of ``domain``'s JSON route (its ``example_route``, else its endpoint)."""
    described = registry.get(domain)
    module, cls = described.service.split(":")
    service = getattr(importlib.import_module(module), cls)
    return next(api for api in service.apis.values() if api.route == described.example_path)


def _answers() -> dict[str, Any]:
    path = os.environ.get(ANSWERS_ENV)
    return json.loads(open(path).read()) if path else {}  # noqa: SIM115 - read once at import


ANSWERS = _answers()


def _endpoint(route: str, answer: Any) -> Any:
    async def endpoint(self: Any, *_: Any, **__: Any) -> Any:  # async: no thread hop, the cheapest BentoML path
        return answer

    endpoint.__name__ = "noop_" + route.strip("/").replace("/", "_")
    return endpoint


def _build() -> type:
    members: dict[str, Any] = {"__doc__": "No-op twins of the domains' JSON endpoints (a serving-overhead ceiling)."}
    for name in registry.names():
        api = json_api(name)
        if api.route not in ANSWERS:
            continue
        answer = api.output_spec.model_validate(ANSWERS[api.route])  # built once; serialised per answer
        func = _endpoint(api.route, answer)
        members[func.__name__] = bentoml.api(func, route=api.route, input_spec=api.input_spec,
                                             output_spec=api.output_spec)
    # the same heap settling as the real services (shared.serving.settle_heap), so that the twin is no slower
    # for a reason the services have removed
    members["settle"] = bentoml.on_startup(lambda self: settle_heap())
    if len(members) == 2:  # BentoML needs one API at least; without answers the service has only this one
        members["noop_ping"] = bentoml.api(lambda self: {"ok": True}, route="/ping")
    return type("NoOp", (), members)


NoOp = bentoml.service(name="tessera_noop", workers=1, traffic={"timeout": 60,
                                                               "max_concurrency": BENTO_MAX_CONCURRENCY})(_build())
