from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.serving import BodySizeLimit, ModelHolder, ModelUnavailable
from shared.tracking import LoadedModel


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
        return LoadedModel(model=None, cfg=None, info={}, domain=name, name=name, version=self.version)  # type: ignore[arg-type]


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


def _run_asgi(app: Any, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "headers": headers}, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_body_limit_by_declared_length_and_by_streamed_bytes() -> None:
    app = BodySizeLimit(_echo_app, max_bytes=5000)
    assert _run_asgi(app, b"x" * 4000, [(b"content-length", b"4000")]) == (200, b"ok")
    status, body = _run_asgi(app, b"x" * 6000, [(b"content-length", b"6000")])
    assert status == 413 and b"larger than 5000 bytes" in body
    status, _ = _run_asgi(app, b"x" * 6000, [])  # chunked: no content-length
    assert status == 413
