from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.serving import ModelHolder, ModelUnavailable, RequestError, RequestGuard, answers_errors, setting
from shared.tracking import LoadedModel
from tests.conftest import error_of


class FakeRegistry:
    """Unit-test stand-in for the MLflow alias lookups."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.loads = 0
        self.fail = False

    def version_of(self, name: str) -> str | None:
        if self.fail:
            raise ConnectionError("registry down")
        return self.version

    def load(self, name: str) -> LoadedModel:
        self.loads += 1
        return LoadedModel(model=None, cfg=None, state=None, domain=name, name=name, version=self.version)  # type: ignore[arg-type]


def test_holder_says_how_to_train_until_a_model_exists_then_hot_swaps() -> None:
    fake = FakeRegistry()
    holder = ModelHolder("forecasting", poll_seconds=3600, loader=fake.load, version_of=fake.version_of)
    try:
        with pytest.raises(ModelUnavailable, match="tessera train forecasting") as info:
            holder.get()
        assert info.value.status == 503
        fake.version = "1"
        assert holder.refresh() is True and holder.get().version == "1"
        assert holder.refresh() is False and fake.loads == 1  # same version: no reload
        fake.version = "2"
        assert holder.refresh() is True and holder.get().version == "2"
        fake.fail = True  # registry outage: keep serving the model we have
        assert holder.refresh() is False and holder.get().version == "2"
    finally:
        holder.close()


def test_one_error_handler_for_sync_and_async_endpoints() -> None:
    @answers_errors
    def sync(x: int) -> int:
        if x < 0:
            raise RequestError(f"x={x} must be >= 0")
        return x

    @answers_errors
    async def run_async(x: int) -> int:
        if x < 0:
            raise ModelUnavailable("no model yet")
        return x

    assert sync(2) == 2 and sync.__name__ == "sync"
    assert error_of(sync(-1)) == (422, "x=-1 must be >= 0")
    assert asyncio.run(run_async(3)) == 3
    assert error_of(asyncio.run(run_async(-1))) == (503, "no model yet")
    with pytest.raises(ZeroDivisionError):  # only refusals become answers; a bug stays a bug
        answers_errors(lambda: 1 // 0)()


def test_settings_come_from_one_variable_per_domain_and_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert setting("weather", "MAX_BODY_BYTES", 7) == 7
    monkeypatch.setenv("TESSERA_WEATHER_MAX_BODY_BYTES", "123")
    assert setting("weather", "max_body_bytes", 7) == 123 and setting("forecasting", "MAX_BODY_BYTES", 7) == 7


def _run_asgi(app: Any, body: bytes, headers: list[tuple[bytes, bytes]], path: str = "/act",
              method: str = "POST") -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": headers, "path": path, "method": method}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok:" + body[:20]})


ROUTES = {"/act": ("application/json", ()), "/forecast": ("multipart/form-data", ("file",)),
          "/model": ("application/json", ())}
JSON = [(b"content-type", b"application/json")]


def _guard(max_bytes: int = 5000) -> RequestGuard:
    return RequestGuard(_echo_app, max_bytes=max_bytes, routes=ROUTES)


def test_body_limit_by_declared_length_and_by_streamed_bytes() -> None:
    app = _guard()
    assert _run_asgi(app, b"x" * 4000, [(b"content-length", b"4000"), *JSON])[0] == 200
    status, body = _run_asgi(app, b"x" * 6000, [(b"content-length", b"6000"), *JSON])
    assert status == 413 and b"larger than 5000 bytes" in body
    assert _run_asgi(app, b"x" * 6000, JSON)[0] == 413  # chunked: no content-length
    assert _run_asgi(app, b"x" * 6000, [], path="/livez", method="GET")[0] == 413  # every path has the limit


def test_a_content_type_the_endpoint_does_not_take_is_a_415() -> None:
    app = _guard()
    assert _run_asgi(app, b"{}", [])[0] == 200  # no content type: JSON, as BentoML reads it
    assert _run_asgi(app, b"{}", [(b"content-type", b"application/json; charset=utf-8")])[0] == 200
    for given in (b"multipart/form-data", b"application/x-www-form-urlencoded", b"application/vnd.bentoml+pickle",
                  b"text/plain"):
        status, body = _run_asgi(app, b"{}", [(b"content-type", given)])
        assert status == 415 and b"takes application/json" in body, given
    assert _run_asgi(app, b"{}", JSON, path="/forecast")[0] == 415
    assert _run_asgi(app, b"", [], path="/docs.json", method="GET")[0] == 200  # not an endpoint: untouched


async def _method_app(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    kind = dict(scope["headers"]).get(b"content-type", b"")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["method"].encode() + b" " + kind + b" " + message["body"]})


def test_get_model_is_answered_as_bentoml_answers_post_model() -> None:
    app = RequestGuard(_method_app, max_bytes=5000, routes=ROUTES)
    assert _run_asgi(app, b"", [], path="/model", method="GET") == (200, b"POST application/json {}")
    assert _run_asgi(app, b"", [(b"content-type", b"text/plain")], path="/model/", method="GET") == (
        200, b"POST application/json {}")
    assert _run_asgi(app, b"", [], path="/act", method="GET")[1].startswith(b"GET")  # only /model
    assert _run_asgi(RequestGuard(_method_app, max_bytes=5000, routes={}), b"", [], path="/model",
                     method="GET")[1].startswith(b"GET")  # a service without /model: untouched


def _multipart(parts: list[bytes], boundary: bytes = b"xyz") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


def test_malformed_multipart_bodies_are_a_400_before_bentoml_reads_them() -> None:
    app = _guard()
    form = [(b"content-type", b"multipart/form-data; boundary=xyz")]
    upload = b'Content-Disposition: form-data; name="file"; filename="s.nc"\r\n\r\nCDF\x01'
    steps = b'Content-Disposition: form-data; name="steps"\r\n\r\n4'
    body = _multipart([upload, steps])
    assert _run_asgi(app, body, form, path="/forecast") == (200, b"ok:" + body[:20])  # replayed whole to BentoML
    status, body = _run_asgi(app, b"{}", [(b"content-type", b"multipart/form-data")], path="/forecast")
    assert status == 400 and b"boundary" in body
    status, body = _run_asgi(app, _multipart([b"\r\nno headers at all"]), form, path="/forecast")
    assert status == 400 and b"malformed multipart body" in body
    as_text = b'Content-Disposition: form-data; name="file"\r\n\r\nhttp://example.com/state.nc'
    status, body = _run_asgi(app, _multipart([as_text]), form, path="/forecast")
    assert status == 400 and b"must be an uploaded file" in body
    status, _ = _run_asgi(app, _multipart([upload]) + b"x" * 6000, form, path="/forecast")
    assert status == 413


def test_every_service_documents_itself_and_its_error_answers() -> None:
    from shared import registry
    from tests.contract import service_of

    for domain in registry.domains():
        spec = service_of(domain).openapi_spec.asdict()
        info = spec["info"]
        assert info["title"] == f"Tessera {domain.name}" and "created with BentoML" not in info["description"]
        assert f"models:/{domain.name}@production" in info["description"] and "contact" not in info
        responses = spec["paths"][domain.endpoint]["post"]["responses"]
        assert {"200", "400", "413", "415", "422", "503"} <= {str(k) for k in responses}
        assert "500" not in {str(k) for k in responses}
        card = spec["paths"]["/model"]
        assert "requestBody" not in card["get"] and card["get"]["responses"][200]["content"]["application/json"][
            "schema"]["required"] == ["name", "version", "run_id", "architecture"]
        assert card["post"]["responses"][200] == card["get"]["responses"][200]
    weather = service_of(registry.get("weather")).openapi_spec.asdict()["paths"]
    answers = weather["/forecast"]["post"]["responses"][200]["content"]
    assert answers["application/x-netcdf"]["schema"]["format"] == "binary"  # the file, and the JSON summary
    assert answers["application/json"] == weather["/forecast_json"]["post"]["responses"][200]["content"][
        "application/json"]


def test_requests_above_the_in_flight_limit_get_a_429_with_retry_after_and_none_below_it() -> None:
    release = asyncio.Event()
    started = 0

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal started
        started += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(slow_app, max_bytes=5000, routes=ROUTES, max_in_flight=3, limit_name="TESSERA_X_MAX_IN_FLIGHT")

    async def one(path: str = "/act") -> tuple[int, dict[bytes, bytes], bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await guard({"type": "http", "headers": JSON, "path": path, "method": "POST"}, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    async def scenario() -> None:
        held = [asyncio.create_task(one()) for _ in range(3)]  # exactly the limit: all admitted
        while started < 3:
            await asyncio.sleep(0)
        status, headers, body = await one()  # one more: refused at once, with the limit's name
        assert status == 429 and headers[b"retry-after"] == b"1"
        assert b"3 requests in flight" in body and b"TESSERA_X_MAX_IN_FLIGHT=3" in body
        model = asyncio.create_task(one("/model"))  # /model is not an endpoint request: never counted
        while started < 4:
            await asyncio.sleep(0)
        release.set()
        assert [(await t)[0] for t in held] == [200, 200, 200] and (await model)[0] == 200
        assert guard.in_flight == 0 and (await one())[0] == 200  # the slots come back

    asyncio.run(scenario())


def test_a_request_does_not_wait_behind_a_refresh_already_under_way() -> None:
    import threading
    import time

    entered, leave = threading.Event(), threading.Event()
    fake = FakeRegistry()

    def slow_version_of(name: str) -> str | None:
        if fake.fail:  # the poller's call to a registry that hangs
            entered.set()
            leave.wait(10)
            raise TimeoutError("registry timed out")
        return None

    holder = ModelHolder("forecasting", poll_seconds=3600, loader=fake.load, version_of=slow_version_of)
    try:
        fake.fail = True
        poller = threading.Thread(target=holder.refresh)
        poller.start()
        assert entered.wait(5)
        holder._last_check = 0.0  # due for a check: get() tries one, but must not queue behind the poller's
        started = time.monotonic()
        with pytest.raises(ModelUnavailable):
            holder.get()
        assert time.monotonic() - started < 1.0
        leave.set()
        poller.join(5)
        with pytest.raises(ModelUnavailable, match="registry unavailable: TimeoutError"):
            holder.get()
    finally:
        leave.set()
        holder.close()


def test_services_bound_the_registry_client_unless_the_environment_says_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.serving import REGISTRY_HTTP_BOUNDS, bound_registry_calls

    for key in REGISTRY_HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    bound_registry_calls()
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


def test_settle_heap_freezes_what_is_alive_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from shared.serving import settle_heap

    try:
        gc.unfreeze()
        monkeypatch.setenv("TESSERA_FREEZE_HEAP", "0")
        settle_heap()
        assert gc.get_freeze_count() == 0
        monkeypatch.delenv("TESSERA_FREEZE_HEAP")
        settle_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the test process's modules, pytest, numpy...
        assert sum(gc.get_count()) < 100  # nothing left for the collector to walk
        settle_heap()  # again (after a model swap): unfreeze, collect, freeze
        assert abs(gc.get_freeze_count() - frozen) < frozen // 10
    finally:
        gc.unfreeze()
