"""The FastAPI app: :func:`create_app` builds it, its lifespan loads the model and starts the
scorer and the control plane.

Everything a route needs hangs off ``app.state.service`` (a :class:`Service`), so tests build
apps with their own settings, several per process, and nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from mdlora import __version__
from mdlora.service.api import admin, feedback, health, predict, rollouts
from mdlora.service.api.errors import error_response, not_allowed, status_of
from mdlora.service.api.predict import PredictFastPath
from mdlora.service.control import ControlPlane
from mdlora.service.errors import Refused, ServiceError, TooLarge
from mdlora.service.feature_store import FeatureStore, RequestEncoder, detect_id_fields
from mdlora.service.feedback import FeedbackBatch, open_feedback
from mdlora.service.metrics import ServiceMetrics
from mdlora.service.registry import open_store
from mdlora.service.runtime import (
    MicroBatcher,
    OnnxRuntime,
    TorchRunner,
    choose_routing,
    configure_thread,
    resolve_device,
    warm_up,
)
from mdlora.service.schemas import BatchPredictRequest, PredictRequest
from mdlora.service.scoring import Predictor
from mdlora.service.settings import ServiceSettings
from mdlora.service.snapshot import ArtifactBase, Snapshot

log = logging.getLogger("mdlora.service")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


class Service:
    """The running parts of one app: control plane (snapshots, registry), scorer, predictor."""

    def __init__(
        self, settings: ServiceSettings, metrics: ServiceMetrics, base: ArtifactBase | None = None
    ) -> None:
        self.settings = settings
        configure_thread(settings.torch_threads)
        self.device = resolve_device(settings.device)
        if base is None:
            base = ArtifactBase.load(settings.artifact_dir, self.device, settings.max_adapter_rank)
        self.routing = choose_routing(base.model, settings.routing)
        self.onnx = (
            OnnxRuntime(threads=settings.torch_threads, device=self.device)
            if settings.runtime == "onnx"
            else None
        )
        store = open_store(
            settings.registry,
            settings.artifact_dir,
            settings.redis_url,
            settings.redis_prefix,
            base.info.model_id,
            settings.redis_timeout_s,
        )
        self.control = ControlPlane(
            base,
            store,
            self._prepare,
            metrics,
            settings.max_adapter_bytes,
            settings.reconcile_interval_s,
            lambda: configure_thread(settings.torch_threads),
        )
        # on a GPU a model call mostly waits for the device, with the interpreter lock free:
        # a scorer thread lets the event loop parse the next requests meanwhile
        self.scorer_thread = (
            self.device.type == "cuda" if settings.scorer_thread is None else settings.scorer_thread
        )
        self.batcher = MicroBatcher(
            metrics,
            settings.max_batch_rows,
            settings.micro_batch,
            settings.torch_threads,
            thread=self.scorer_thread,
        )
        self.user_field, self.item_field = detect_id_fields(
            base.encoder, base.info.manifest, settings.user_id_field, settings.item_id_field
        )
        self.feature_client: Any = None
        store_reader = None
        if settings.use_feature_store:
            import redis.asyncio

            self.feature_client = redis.asyncio.Redis.from_url(
                settings.redis_url,
                decode_responses=True,
                socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s,
            )
            store_reader = FeatureStore(
                self.feature_client, settings.redis_prefix, settings.feature_cache_s
            )
        self.predictor = Predictor(
            RequestEncoder(base.encoder),
            self.batcher,
            metrics,
            self.user_field,
            self.item_field,
            settings.unknown_domain,
            store_reader,
            settings.max_items,
        )
        self.feedback = open_feedback(settings, metrics, self.control, base.info.model_id)
        self.predictor.feedback = self.feedback

    def _prepare(self, snapshot: Snapshot) -> None:
        """Attach the runtime's runner to a new snapshot and warm it up (builder thread)."""
        snapshot.runner = self.onnx.runner(snapshot) if self.onnx else TorchRunner(snapshot)
        warm_up(snapshot)

    def start(self) -> None:
        self.batcher.start()
        self.control.start()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.control.stop)
        await asyncio.to_thread(self.batcher.stop)
        await asyncio.to_thread(self.feedback.close)
        if self.onnx is not None:
            self.onnx.close()
        if self.feature_client is not None:
            await self.feature_client.aclose()

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "runtime": s.runtime,
            "device": str(self.device),
            "registry": s.registry,
            "registry_ok": self.control.registry_ok,
            "unknown_domain": s.unknown_domain,
            "micro_batch": s.micro_batch,
            "scorer_thread": self.scorer_thread,
            "routing": self.routing,
            "threads": s.torch_threads,
            "feature_store": s.use_feature_store,
            "user_id_field": self.user_field,
            "item_id_field": self.item_field,
            "limits": {
                "max_items": s.max_items,
                "max_body_bytes": s.max_body_bytes,
                "max_batch_requests": s.max_batch_requests,
                "max_adapter_bytes": s.max_adapter_bytes,
                "max_adapter_rank": s.max_adapter_rank,
            },
        }


class MetricsMiddleware:
    """Counts every HTTP request by route template, domain and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        info: dict[str, Any] = {"domain": "", "status": 500}
        scope["mdlora"] = info

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "(unmatched)"
            self.metrics.observe(path, info["domain"], info["status"], time.perf_counter() - start)


class BodyLimitMiddleware:
    """Refuses a request body over its route's limit while it streams in, before it is held in
    memory or spooled to disk (uploads included): 413 naming the setting to raise."""

    OTHER_LIMIT = 64 << 10  # no other route takes a body

    def __init__(self, app: ASGIApp, settings: ServiceSettings) -> None:
        self.app, self.settings = app, settings

    def _limit(self, path: str) -> tuple[int, str]:
        if path.startswith("/predict"):
            return self.settings.max_body_bytes, "MDLORA_MAX_BODY_BYTES"
        if path == "/feedback":
            return self.settings.feedback_max_body_bytes, "MDLORA_FEEDBACK_MAX_BODY_BYTES"
        if path.rstrip("/") == "/v1/adapters":
            return self.settings.max_adapter_bytes + (1 << 20), "MDLORA_MAX_ADAPTER_BYTES"
        return self.OTHER_LIMIT, "(fixed)"

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self._limit(scope["path"])

        def too_large(size: int) -> str:
            return (
                f"request body is {size} bytes or more, over the limit of {limit} bytes "
                f"for this route ({setting})"
            )

        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = error_response(TooLarge(too_large(int(value))))
                await response(scope, receive, send)
                return
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # an HTTPException passes FastAPI's body parsing unchanged (a ServiceError
                    # would become its 400), answered as TooLarge's status
                    raise HTTPException(status_of(TooLarge), too_large(received))
            return message

        await self.app(scope, limited, send)


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route answers on ``scope``'s path (Starlette's 405 names only the
    first route's: ``OPTIONS /v1/adapters`` said ``POST``, not ``GET, POST``)."""
    return [
        method
        for method in HTTP_METHODS
        if any(
            isinstance(route, BaseRoute)
            and route.matches({**scope, "method": method})[0] == Match.FULL
            for route in app.router.routes
        )
    ]


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The generated schema plus the raw-body predict models (routes parse bodies themselves)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (PredictRequest, BatchPredictRequest, FeedbackBatch):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    return build


async def _warm_upload_route(app: FastAPI) -> None:
    """Run the adapter upload route once (refused: no token), and anyio's worker threads, so
    that their first-use work (imports, set-up: ~50 ms measured) does not stall serving at the
    first real registration. Sent to the router, past the middlewares: no metrics, nothing
    registered."""
    boundary = b"warmup"
    body = (
        b'--warmup\r\nContent-Disposition: form-data; name="adapter_config"; filename="c"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n{}\r\n--warmup--\r\n"
    )
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/adapters", "raw_path": b"/v1/adapters",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0), "state": {}, "app": app,
        "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        return None

    with contextlib.suppress(Exception):  # the refusal is the expected outcome
        await app.router(scope, receive, send)
    # an upload is read on anyio's worker threads: load that backend and start one now
    await anyio.to_thread.run_sync(lambda: None)


def tune_interpreter() -> None:
    """Interpreter settings for a process that only serves (``mdlora serve``).

    Everything loaded by now (torch, the app, the model) lives as long as the process: moved
    out of the cyclic collector's reach, a full collection scans only what is created later
    instead of ~350k objects (~0.5 s measured, a p99 spike). A snapshot build on the builder
    thread holds the interpreter lock in short bursts; a 1 ms switch interval (default 5 ms)
    lets the event loop take it back sooner.
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(0.001)


def create_app(
    settings: ServiceSettings | None = None,
    base: ArtifactBase | None = None,
    serving_process: bool = False,
) -> FastAPI:
    """The scoring service app. ``settings`` default: from the environment (``MDLORA_*``);
    ``base``: an already loaded artifact (else ``settings.artifact_dir`` is loaded at start);
    ``serving_process``: the process does nothing else, see :func:`tune_interpreter`."""
    settings = settings or ServiceSettings()  # type: ignore[call-arg]
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        def start() -> Service:
            service = Service(settings, metrics, base)
            service.start()
            return service

        service = await asyncio.to_thread(start)
        configure_thread(settings.torch_threads)  # inline scoring runs on this (the loop's) thread
        await _warm_upload_route(app)
        if serving_process:
            tune_interpreter()
        app.state.service = service
        log.info(
            "serving %s (%s runtime on %s, registry %s)",
            service.control.current.info.model_version,
            settings.runtime,
            service.device,
            settings.registry,
        )
        try:
            yield
        finally:
            app.state.service = None
            await service.aclose()

    app = FastAPI(
        title="mdlora scoring service",
        version=__version__,
        description="Multi-domain CTR scoring with low-rank domain adapters, hot-loaded.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.include_router(predict.router)
    app.include_router(admin.router)
    app.include_router(rollouts.router)
    app.include_router(feedback.router)
    app.include_router(health.router)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # counts every answer it passes
    app.add_middleware(PredictFastPath, fastapi_app=app, metrics=metrics)  # outermost

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        return not_allowed(request.method, request.url.path, allowed_methods(app, request.scope))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg")),
                "type": str(e.get("type")),
            }
            for e in exc.errors()
        ]
        where = ".".join(errors[0]["loc"]) if errors else "request"
        msg = errors[0]["msg"] if errors else "invalid"
        if "Expected UploadFile" in msg:  # a form text field where a file part belongs
            field = errors[0]["loc"][-1]
            msg = f"send {field} as a file part (curl -F {field}=@{field}.json style), not as text"
            if field == "adapter_model":
                msg = msg.replace(".json", ".safetensors")
        return error_response(Refused(f"invalid request at {where}: {msg}", errors=errors))

    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
