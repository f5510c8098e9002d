"""HTTP client helpers for the domains' ``predict`` (``tessera predict``, the demo): errors with the reason."""

from __future__ import annotations

import time
from typing import Any

import httpx


class ServiceError(RuntimeError):
    """A service answered with an error status; the message holds its reason."""

    def __init__(self, url: str, status: int, text: str) -> None:
        super().__init__(f"{status} from {url}: {text}")
        self.status = status


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise ServiceError(str(response.request.url), response.status_code, response.text)
    return response


def post_json(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    answer: dict[str, Any] = check(httpx.post(url, json=body, timeout=timeout)).json()
    return answer


def wait_for_model(url: str, version: str | int | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """``POST {url}/model`` until the service serves a model (``version``, when given); its answer, or the
    last one seen when the time is up."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{url.rstrip('/')}/model", json={}, timeout=30)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            info = response.json()
            if version is None or str(info.get("version")) == str(version):
                return info
        time.sleep(1)
    return info
