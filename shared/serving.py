"""Serving pieces every domain's BentoML service uses.

- :class:`ModelHolder` keeps ``models:/<domain>@production`` loaded and swaps in a newly promoted version
  without a restart (a background thread polls the alias); until a model exists it raises
  :class:`ModelUnavailable`, which the services turn into a 503 that says how to train one.
- :class:`BodySizeLimit` is an ASGI middleware answering 413 for bodies above a limit before they are read.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import BaseModel

from shared.tracking import PRODUCTION, LoadedModel, client, load_registered, production_version

log = logging.getLogger("tessera.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ModelRef(BaseModel):
    """The model version that produced an answer (``LoadedModel.describe()``), echoed in every response."""

    name: str | None
    version: str | None
    run_id: str | None
    architecture: str | None = None


class RequestError(Exception):
    """A request the service refuses, with the HTTP status and the reason shown to the caller."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class ModelUnavailable(RequestError):
    """No model holds the production alias yet (or the registry is unreachable): a 503 with the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)


def error_response(exc: RequestError) -> Any:
    """``{"error": reason}`` with the exception's status. BentoML hides the text of its own 5xx errors,
    and a caller needs to read why there is no model yet."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=exc.status)


def serving_alias() -> str:
    """The registry alias a service answers with: ``production`` unless ``TESSERA_SERVE_ALIAS`` says
    otherwise (a canary or benchmark server on another port serving ``@staging``, say)."""
    return os.environ.get("TESSERA_SERVE_ALIAS", PRODUCTION)


def how_to_train(domain: str) -> str:
    alias = serving_alias()
    if alias != PRODUCTION:
        return f"no '{domain}' model holds alias @{alias}; set it in the MLflow registry"
    return (f"no '{domain}' model is registered with alias @{PRODUCTION} yet; train one with "
            f"`tessera train {domain}` (or `make demo`), and this service picks it up within seconds")


class ModelHolder:
    """The served model of one domain (alias ``production`` by default), reloaded when the alias moves."""

    def __init__(self, domain: str, *, poll_seconds: float | None = None, device: str = "cpu",
                 loader: Callable[[str], LoadedModel | None] | None = None,
                 version_of: Callable[[str], str | None] | None = None) -> None:
        self.domain = domain
        self.device = device
        self.poll_seconds = poll_seconds if poll_seconds is not None else float(
            os.environ.get("TESSERA_RELOAD_SECONDS", "5"))
        self.alias = serving_alias()
        self._loader = loader or (lambda name: load_registered(name, self.alias, device=self.device))
        self._version_of = version_of or self._alias_version
        self._current: LoadedModel | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._last_check = 0.0
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._poll, name=f"{domain}-model-poll", daemon=True)
        self._thread.start()

    def _alias_version(self, name: str) -> str | None:
        version = production_version(client(), name, self.alias)
        return str(version.version) if version is not None else None

    def refresh(self) -> bool:
        """Load the production version if it differs from the one held; True when a new model came in."""
        with self._lock:
            self._last_check = time.monotonic()
            try:
                wanted = self._version_of(self.domain)
                if wanted is None or (self._current is not None and self._current.version == wanted):
                    self._error = None if wanted is not None else how_to_train(self.domain)
                    return False
                loaded = self._loader(self.domain)
            except Exception as exc:  # registry down or a broken artifact: keep serving what we have
                self._error = f"model registry unavailable: {type(exc).__name__}: {exc}"
                log.warning("refresh of %s failed: %s", self.domain, self._error)
                return False
            if loaded is None:
                self._error = how_to_train(self.domain)
                return False
            previous = self._current.version if self._current else None
            self._current, self._error = loaded, None
            log.info("%s: now serving version %s (was %s)", self.domain, loaded.version, previous)
            return True

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    def get(self) -> LoadedModel:
        current = self._current
        if current is None:
            if time.monotonic() - self._last_check > 1.0:  # a first model: don't wait for the poll
                self.refresh()
                current = self._current
            if current is None:
                raise ModelUnavailable(self._error or how_to_train(self.domain))
        return current

    def close(self) -> None:
        self._stop.set()


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies above ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0
        rejected = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    rejected = True
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            if rejected:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = (f'{{"error": "request body larger than {self.max_bytes} bytes; send less history or '
                f'split the request"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
