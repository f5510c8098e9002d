"""The serving skeleton every domain's BentoML service is built on.

- :class:`DomainService`: the base of a domain's service class. It holds the served model (a
  :class:`ModelHolder` on ``models:/<domain>@production``, hot-swapped when the alias moves), answers
  ``GET /model`` (and ``POST``) for every domain the same way, sets torch's threads from the service's
  ``resources=`` and stops the model poller on shutdown. :class:`BatchingService` adds batching of model calls
  across requests (:mod:`shared.batching`), run in a model process of its own (:mod:`shared.model_process`).
- :func:`answers_errors`: the one error handler of every endpoint: a :class:`RequestError` becomes
  ``{"error": reason}`` with its status (a 4xx, or a 503 while there is no model).
- :class:`RequestGuard` and :func:`guard`: an ASGI middleware in front of a service that refuses what
  would otherwise fail inside BentoML before a service's code runs: bodies above the domain's limit (413), a
  content type the endpoint does not take (415), malformed multipart bodies and file fields that are not
  uploads (400).
- :func:`setting`: service settings from ``TESSERA_<DOMAIN>_<NAME>`` environment variables.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, ClassVar, TypeVar

import bentoml
from pydantic import BaseModel

from shared import registry
from shared.batching import Batcher
from shared.errors import ModelUnavailable, RequestError
from shared.model_process import ModelProcess, ModelProcessError, resolve
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


def error_response(exc: RequestError) -> Any:
    """``{"error": reason}`` with the exception's status. BentoML hides the text of its own 5xx errors,
    and a caller needs to read why there is no model yet."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=exc.status)


F = TypeVar("F", bound=Callable[..., Any])


def answers_errors(func: F) -> F:
    """Decorate a service endpoint (sync or async): a :class:`RequestError` it raises becomes the error answer.
    The wrapper carries the endpoint's signature as ``__signature__``: BentoML reads the signature of an endpoint
    on every call, and without it ``inspect`` unwraps the wrapper first (16 against 2 µs here)."""
    signature = inspect.signature(func)
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except RequestError as exc:
                return error_response(exc)

        run_async.__signature__ = signature  # type: ignore[attr-defined]
        return run_async  # type: ignore[return-value]

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RequestError as exc:
            return error_response(exc)

    run.__signature__ = signature  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


def setting(domain: str, name: str, default: int) -> int:
    """``TESSERA_<DOMAIN>_<NAME>`` (e.g. ``TESSERA_WEATHER_MAX_BODY_BYTES``) as an integer, else ``default``."""
    raw = os.environ.get(f"TESSERA_{domain.upper()}_{name.upper()}")
    return int(raw) if raw else default


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


BENTO_MODEL_ENV = "TESSERA_BENTO_MODEL"  # a BentoML model tag: serve that packed model, not the registry's alias


def bento_model_name(domain: str) -> str:
    """The BentoML model a domain's Bento packs (``tessera bento``): ``tessera-<domain>``."""
    return f"tessera-{domain}"


def load_bento_model(tag: str, device: str = "cpu") -> LoadedModel:
    """The Tessera model inside a BentoML model imported from the registry (``bentoml.mlflow.import_model``,
    labelled with the registered version and run by ``tessera bento``)."""
    from pathlib import Path

    from shared.tracking import load_model_dir

    model = bentoml.models.get(tag)
    loaded = load_model_dir(Path(model.path_of("mlflow_model")), device)
    labels = model.info.labels
    loaded.name, loaded.version, loaded.run_id = loaded.domain, labels.get("registered_version"), labels.get("run_id")
    return loaded


# A service asks the registry every few seconds and must say "registry unavailable" within seconds, not after
# the MLflow client's default retries (7 with exponential backoff: about 4 minutes for a refused connection).
# Training keeps the long defaults: there a retry outlasts an MLflow restart.
REGISTRY_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_registry_calls() -> None:
    """Short MLflow client retries and timeouts for this process (a service's), unless the environment sets
    its own."""
    for key, value in REGISTRY_HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def settle_heap() -> None:
    """Collect cyclic garbage once, then freeze every object alive now (``gc.freeze``): the collector no longer
    walks them. A service's heap holds ~0.5 M long-lived objects (torch, pandas, MLflow, BentoML, the model); a
    full collection walked them all, ~0.3 s with the event loop stopped, every second or two under load (a
    quarter of the process's time at 100 clients). Refcounting still frees frozen objects; called again after
    every model swap (unfreezing first, so that the previous model's cycles are collected).
    ``TESSERA_FREEZE_HEAP=0`` turns it off."""
    import gc

    if os.environ.get("TESSERA_FREEZE_HEAP", "1") == "0":
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelHolder:
    """The served model of one domain (alias ``production`` by default), reloaded when the alias moves. With a
    ``packed`` BentoML model tag (a Bento built by ``tessera bento``), that model instead: one fixed version, no
    registry needed."""

    def __init__(self, domain: str, *, poll_seconds: float | None = None, device: str = "cpu",
                 loader: Callable[[str], LoadedModel | None] | None = None,
                 version_of: Callable[[str], str | None] | None = None, packed: str | None = None) -> None:
        self.domain = domain
        self.device = device
        self.poll_seconds = poll_seconds if poll_seconds is not None else float(
            os.environ.get("TESSERA_RELOAD_SECONDS", "5"))
        self.alias = serving_alias()
        self._loader = loader or (lambda name: load_registered(name, self.alias, device=self.device))
        self._version_of = version_of or self._alias_version
        if packed and loader is None:
            self._loader = lambda name: load_bento_model(packed, device)
            self._version_of = lambda name: str(bentoml.models.get(packed).info.labels.get("registered_version"))
        self._current: LoadedModel | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._last_check = 0.0
        self._stop = threading.Event()
        self._serving = False  # the first load, from __init__: the service's on_startup settles the heap after it
        self.refresh()
        self._serving = True
        self._thread = threading.Thread(target=self._poll, name=f"{domain}-model-poll", daemon=True)
        self._thread.start()

    def _alias_version(self, name: str) -> str | None:
        version = production_version(client(), name, self.alias)
        return str(version.version) if version is not None else None

    def refresh(self, wait: bool = True) -> bool:
        """Load the production version if it differs from the one held; True when a new model came in. With
        ``wait=False``, return False at once while another refresh is under way (a request does not queue
        behind the poller's call to a slow or unreachable registry)."""
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            return self._refresh()
        finally:
            self._lock.release()

    def _refresh(self) -> bool:
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
        if self._serving:
            settle_heap()  # the model and what loading it left behind: out of the collector's way
        log.info("%s: now serving version %s (was %s)", self.domain, loaded.version, previous)
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    @property
    def loaded(self) -> LoadedModel | None:
        """The model held now, without asking the registry (None: none yet)."""
        return self._current

    def get(self) -> LoadedModel:
        current = self._current
        if current is None:
            if time.monotonic() - self._last_check > 1.0:  # a first model: don't wait for the poll
                self.refresh(wait=False)
                current = self._current
            if current is None:
                raise ModelUnavailable(self._error or how_to_train(self.domain))
        return current

    def close(self) -> None:
        self._stop.set()



class DomainService:
    """Base of a domain's ``@bentoml.service`` class: the served model, ``/model``, threads and shutdown.

    A subclass sets ``domain`` and adds its endpoints; each reads ``self.holder.get()`` (a 503 with how to train
    a model until one is registered) and raises :class:`RequestError` for bad input.
    """

    domain: ClassVar[str]

    def __init__(self) -> None:
        bound_registry_calls()
        self.holder = ModelHolder(self.domain, packed=os.environ.get(BENTO_MODEL_ENV) or packed_model(self))

    def __is_ready__(self) -> bool:
        """``/readyz``: 200 only while a model is loaded (``/livez`` stays liveness: the process answers)."""
        return self.holder.loaded is not None

    @bentoml.on_startup
    def use_declared_cpus(self) -> None:
        """torch's intra-op threads = the service's ``resources={"cpu": ...}``; then the heap settled."""
        import torch

        torch.set_num_threads(declared_cpus(self))
        settle_heap()

    _card: tuple[LoadedModel, dict[str, Any]] | None = None  # the last model card and its model

    def card_of(self, loaded: LoadedModel) -> dict[str, Any]:
        """``loaded``'s model card (what ``/model`` answers, and what requests are checked against), computed
        once per model."""
        held = self._card
        if held is None or held[0] is not loaded:
            card = {**loaded.describe(), **registry.get(self.domain).describe(loaded.cfg, loaded.state)}
            held = self._card = (loaded, card)
        return held[1]

    def model_card(self) -> dict[str, Any]:
        """What ``/model`` answers (raises :class:`ModelUnavailable` while there is no model)."""
        return self.card_of(self.holder.get())

    @bentoml.api(route="/model")
    @answers_errors
    def model(self) -> dict[str, Any]:
        """The served model: name, version, run and architecture, and the inputs it expects."""
        return self.model_card()

    @bentoml.on_shutdown
    def stop_polling(self) -> None:
        self.holder.close()


class BatchingService(DomainService):
    """Base of a domain service whose model calls are batched across requests: an endpoint checks its request
    against ``self.holder.get()`` (a 503 until a model exists), then awaits ``self.batcher.submit(loaded,
    items)``; the items of the requests that waited together run as one call of ``batch_function`` (a
    module-level ``"package.module:function"``, ``(loaded, items) -> one result per item``) while the event
    loop goes on with other requests (:mod:`shared.batching`). ``max_batch_items`` caps a batch
    (``TESSERA_<DOMAIN>_MAX_BATCH`` overrides it).

    The calls run in a child process of their own (:class:`shared.model_process.ModelProcess`): there the
    model does not wait for the GIL behind the event loop. ``TESSERA_<DOMAIN>_MODEL_PROCESS=0`` runs them on a
    thread of the service process instead (one process less, the model's memory once)."""

    batch_function: ClassVar[str]
    max_batch_items: ClassVar[int] = 64

    def __init__(self) -> None:
        super().__init__()
        self.model_process: ModelProcess | None = None
        run: Callable[[LoadedModel, list[Any]], Sequence[Any]]
        if setting(self.domain, "MODEL_PROCESS", 1):
            self.model_process = ModelProcess(self.batch_function, name=f"{self.domain}-model")
            run = functools.partial(in_model_process, self.model_process)
        else:
            run = resolve(self.batch_function)
        self.batcher: Batcher[Any, Any] = Batcher(
            run, max_items=setting(self.domain, "MAX_BATCH", self.max_batch_items), name=f"{self.domain}-model")

    @bentoml.on_startup
    def start_model_process(self) -> None:
        """The child starts with the service (torch's import and the model's transfer are not a request's),
        with the service's declared CPUs less the event loop's one as torch's threads. A child that cannot
        start here is logged, not fatal: the first batch tries again, and fails with the reason."""
        if self.model_process is not None:
            self.model_process.threads = max(1, declared_cpus(self) - 1)
            loaded = self.holder.loaded
            if loaded is not None:
                try:
                    self.model_process.warm(loaded)
                except Exception as exc:  # noqa: BLE001 - a failed warm-up must not stop the service's start
                    log.warning("%s: the model process did not start: %r", self.domain, exc)

    @bentoml.on_shutdown
    def stop_batcher(self) -> None:
        self.batcher.close()
        if self.model_process is not None:
            self.model_process.close()


def in_model_process(process: ModelProcess, loaded: LoadedModel, items: list[Any]) -> Sequence[Any]:
    """``process(loaded, items)``; a model process that died while running the batch makes each of its requests a
    503 with the reason (the process starts again with the next batch), not a 500."""
    try:
        return process(loaded, items)
    except ModelProcessError as exc:
        raise ModelUnavailable(f"{exc}: try again") from exc


def packed_model(instance: Any) -> str | None:
    """The tag of the domain's model packed into the Bento this service runs from (``tessera bento``); None when
    it runs from source (then it serves the registry's alias)."""
    import sys

    cls = type(instance)
    service = getattr(sys.modules.get(cls.__module__), cls.__name__, None)  # the @bentoml.service object
    bento = getattr(service, "bento", None)
    if bento is None:
        return None
    wanted = bento_model_name(instance.domain)
    return next((str(m.tag) for m in bento.info.models if m.tag.name == wanted), None)


def declared_cpus(instance: Any, default: int = 1) -> int:
    """The ``cpu`` of the ``resources=`` a service instance was declared with (``default`` when none)."""
    service = getattr(instance, "bento_service", None)
    resources = (getattr(service, "config", None) or {}).get("resources") or {}
    try:
        return max(1, int(float(resources.get("cpu", default))))
    except (TypeError, ValueError):
        return default


ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = "application/json"
RETRY_AFTER_SECONDS = 1  # what a 429 (more requests in flight than the service's limit) asks a caller to wait
# BentoML's own concurrency gate (traffic max_concurrency) answers 429 without Retry-After: every service sets it
# far above its RequestGuard limit, so that the guard alone sheds load
BENTO_MAX_CONCURRENCY = 4096
MULTIPART = "multipart/form-data"
MODEL_ROUTE = "/model"


class _TooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware: refuse, with the reason, requests that would fail before a service's code runs.

    ``routes`` maps each endpoint's path to its media type and, for multipart endpoints, its file fields.
    Bodies above ``max_bytes`` (declared or streamed) get a 413; a content type other than the endpoint's (none
    counts as JSON) a 415; a multipart body without a boundary, one that does not parse, a part without a
    name, or a file field that is not an uploaded file (BentoML would fetch a string there as a URL) a 400.
    Other paths (health, docs, metrics) pass untouched.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, routes: Mapping[str, tuple[str, tuple[str, ...]]],
                 max_in_flight: int = 0, limit_name: str = "") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.routes = dict(routes)
        self.max_in_flight = max_in_flight  # 0: no limit
        self.limit_name = limit_name
        self.in_flight = 0  # endpoint requests being worked on (one event loop per worker: no lock needed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", "")).rstrip("/") or "/"
        if not self.max_in_flight or path not in self.routes or path == MODEL_ROUTE:
            await self._handle(scope, receive, send, path)
            return
        if self.in_flight >= self.max_in_flight:
            await _refuse(send, 429, f"busy: {self.in_flight} requests in flight, this service's limit "
                                     f"({self.limit_name}={self.max_in_flight}); retry after {RETRY_AFTER_SECONDS} s",
                          headers=[(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
            return
        self.in_flight += 1
        try:
            await self._handle(scope, receive, send, path)
        finally:
            self.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        if path == MODEL_ROUTE and scope.get("method") in ("GET", "HEAD") and path in self.routes:
            # GET /model: the same answer as BentoML's POST /model (its APIs take POST only), with no body
            headers_out = [(k, v) for k, v in scope.get("headers") or [] if k not in (b"content-length",
                                                                                      b"content-type")]
            scope = {**scope, "method": "POST", "headers": [*headers_out, (b"content-type", JSON.encode()),
                                                            (b"content-length", b"2")]}
            await self.app(scope, _replay(b"{}"), send)
            return
        route = self.routes.get(path)
        if route is None or scope.get("method") != "POST":
            await self._limited(scope, receive, send)
            return
        media, file_fields = route
        raw_type = headers.get(b"content-type", b"").decode("latin-1")
        given = raw_type.split(";")[0].strip().lower()
        if (given or JSON) != media:
            await _refuse(send, 415, f"this endpoint takes {media}, not {given or 'a body without a Content-Type'}")
            return
        if media != MULTIPART:
            await self._limited(scope, receive, send)
            return
        try:
            body = await self._read(receive)
        except _TooLarge:
            await self._too_large(send)
            return
        problem = await _multipart_problem(raw_type, body, file_fields)
        if problem:
            await _refuse(send, 400, problem)
            return
        await self.app(scope, _replay(body), send)

    async def _read(self, receive: Receive) -> bytes:
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        return b"".join(chunks)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
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
                await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        await _refuse(send, 413, f"request body larger than {self.max_bytes} bytes; send less history or split "
                                 f"the request")


async def _multipart_problem(content_type: str, body: bytes, file_fields: tuple[str, ...]) -> str | None:
    """Why ``body`` is not a multipart form BentoML can read (None when it is)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartParser

    if "boundary=" not in content_type:
        return "multipart/form-data needs a boundary parameter in its Content-Type"

    async def stream() -> Any:
        yield body

    try:
        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
    except Exception as exc:  # the parser's errors (MultiPartException, KeyError on a part without headers, ...)
        return f"malformed multipart body: {type(exc).__name__}: {exc}"
    try:
        for name in file_fields:
            values = form.getlist(name)
            if any(not isinstance(v, UploadFile) for v in values):
                return f"field {name!r} must be an uploaded file (a part with a filename)"
    finally:
        await form.close()
    return None


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _refuse(send: Send, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    import json

    body = json.dumps({"error": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


README = "the Tessera README (README.md in the repository), section Query"  # where the OpenAPI pages point
ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string", "description": "the reason"}},
                "required": ["error"]}
MODEL_CARD_SCHEMA = {  # what GET/POST /model answer: the version served, then what the domain's model expects
    "type": "object", "required": ["name", "version", "run_id", "architecture"], "additionalProperties": True,
    "properties": {"name": {"type": "string", "description": "the registered model (the domain's name)"},
                   "version": {"type": "string", "nullable": True, "description": "the registered version served"},
                   "run_id": {"type": "string", "nullable": True, "description": "the MLflow run that trained it"},
                   "architecture": {"type": "string", "nullable": True, "description": "the model of the domain"}},
    "description": "the served version, then the inputs its model expects (the domain's own fields: columns and "
                   "lookback, grid and channels, observation layout...)"}
ERROR_ANSWERS = {  # what every endpoint answers besides 200, with {"error": reason}
    "400": "the body does not fit the endpoint's schema (types, NaN or infinite numbers, unknown fields, ranges), "
           "or a malformed multipart body",
    "413": "the body is larger than the domain's limit (TESSERA_<DOMAIN>_MAX_BODY_BYTES)",
    "415": "a content type the endpoint does not take",
    "422": "a valid body that does not fit the served model (its columns, grid, shapes, horizon...)",
    "429": "more requests in flight than the service's limit (TESSERA_<DOMAIN>_MAX_IN_FLIGHT); the Retry-After "
           "header says when to try again",
    "503": "no model holds the served alias yet (the answer says how to train one), or the registry is down",
}


def guard(service: Any, domain: str, answers: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None) -> None:
    """Put :class:`RequestGuard` in front of the BentoML ``service`` of ``domain`` (every endpoint's media type
    and file fields from its own signature, and the body limit ``TESSERA_<DOMAIN>_MAX_BODY_BYTES``, the domain's
    ``max_body_bytes`` by default), and make its OpenAPI document describe the domain, the version it serves and
    the error answers. ``answers`` describes the 200 answer of endpoints whose return type cannot (a file, or one
    of several media types): route -> (description, {media type: JSON schema, or the route whose 200 answer has
    that media type's schema})."""
    routes = {}
    for api in service.apis.values():
        spec = api.input_spec
        routes[api.route.rstrip("/") or "/"] = (spec.mime_type(), tuple(getattr(spec, "multipart_fields", ())))
    limit = setting(domain, "MAX_BODY_BYTES", registry.get(domain).max_body_bytes)
    in_flight = setting(domain, "MAX_IN_FLIGHT", registry.get(domain).max_in_flight)
    service.add_asgi_middleware(RequestGuard, max_bytes=limit, routes=routes, max_in_flight=in_flight,
                                limit_name=f"TESSERA_{domain.upper()}_MAX_IN_FLIGHT")
    _describe(service, domain, limit, dict(answers or {}))


def _served_version() -> str:
    """The model version the running service answers with ("none yet"; "not running" outside a server)."""
    try:
        instance = bentoml.get_current_service()
    except Exception:  # not inside a server: the document is being built or inspected
        return "not running"
    holder = getattr(instance, "holder", None)
    if holder is None:
        return "see /model"
    loaded = holder.loaded
    return f"v{loaded.version}" if loaded is not None else "none yet"


def _describe(service: Any, domain: str, limit: int, answers: dict[str, tuple[str, Mapping[str, Any]]]) -> None:
    """The service's own OpenAPI document: title, description, the version served, and the 4xx/503 answers of
    every endpoint (BentoML's default page describes BentoML instead)."""
    import inspect

    described = registry.get(domain)
    base = type(service)

    class DescribedService(base):  # type: ignore[misc,valid-type]
        __slots__ = ()

        @property
        def openapi_spec(self) -> Any:
            import attr

            spec = super().openapi_spec
            served = _served_version()
            description = (
                f"{inspect.cleandoc(self.inner.__doc__ or '')}\n\n"
                f"**Domain** `{domain}` (models: {', '.join(described.models)}); **serves** "
                f"`models:/{domain}@{serving_alias()}`, now **{served}** (`GET /model` tells which).\n\n"
                f"**Endpoint** `POST {described.endpoint}`; bodies over {limit:,} bytes get a 413. Errors are "
                f'`{{"error": reason}}` with the status below. Guide: {README}')
            info = attr.evolve(spec.info, title=f"Tessera {domain}", version=served, description=description,
                               contact=None)
            endpoints = routes_of(self)
            for path, item in spec.paths.items():
                operation = getattr(item, "post", None)
                if operation is None or path not in endpoints:
                    continue
                responses = operation["responses"] if isinstance(operation, dict) else operation.responses
                for status, text in ERROR_ANSWERS.items():
                    responses[int(status)] = {"description": text,
                                              "content": {"application/json": {"schema": ERROR_SCHEMA}}}
                responses.pop(500, None)  # refused bodies and missing models are 4xx/503, never a 500
                responses.pop(404, None)
            paths = dict(spec.paths)
            for route, (text, media) in answers.items():
                operation = paths[route].post
                content = {kind: (paths[schema].post["responses"][200]["content"][JSON] if isinstance(schema, str)
                                  else {"schema": dict(schema)}) for kind, schema in media.items()}
                operation["responses"][200] = {"description": text, "content": content}
            card = paths.get(MODEL_ROUTE)
            if card is not None and isinstance(card.post, dict):
                answer = {"description": "the served model", "content": {JSON: {"schema": MODEL_CARD_SCHEMA}}}
                post = {**card.post, "responses": {**card.post["responses"], 200: answer}}
                get = {k: v for k, v in post.items() if k != "requestBody"}
                get.update(operationId=f"{post.get('operationId', 'model')}__get", responses={
                    200: answer, 503: post["responses"].get(503, {"description": ERROR_ANSWERS["503"]})})
                paths[MODEL_ROUTE] = attr.evolve(card, post=post, get=get)
            return attr.evolve(spec, info=info, paths=paths)

    service.__class__ = DescribedService


def routes_of(service: Any) -> set[str]:
    return {api.route for api in service.apis.values()}
