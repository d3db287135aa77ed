"""``POST /predict`` and ``POST /predict/batch``: the serving hot path.

The body is read raw and validated with the pydantic models in one pass (pydantic-core's JSON
parser), and the answer is written with orjson: no intermediate Python JSON objects.

:class:`PredictFastPath` (outermost ASGI middleware) answers these two routes (and
``POST /feedback``) itself, without Starlette's routing, request objects and dependency
solving: that stack cost about as much as the rest of the request together (measured ~0.4 ms
of ~1.2 ms per 100-candidate request at concurrency 8). The FastAPI routes below document the
API (OpenAPI) and answer requests the fast path does not see (e.g. under a ``root_path``);
both call :func:`answer`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response

from mdlora.service.api.deps import get_service, parse_body, set_domain_label
from mdlora.service.api.errors import headers_of, status_of
from mdlora.service.errors import BadRequest, NotFound, Refused, ServiceError, TooLarge, Unavailable
from mdlora.service.feedback import FeedbackBatch
from mdlora.service.metrics import UNKNOWN_DOMAIN_LABEL, ServiceMetrics
from mdlora.service.schemas import (
    BatchPredictRequest,
    BatchPredictResponse,
    ErrorBody,
    PredictRequest,
    PredictResponse,
)

if TYPE_CHECKING:
    from mdlora.service.app import Service

log = logging.getLogger("mdlora.service")
router = APIRouter(tags=["predict"])
PREDICT, BATCH = "/predict", "/predict/batch"
FEEDBACK = "/feedback"  # answered here too (service.api.feedback documents it)


Headers = dict[str, str] | None


async def answer(service: Service, path: str, body: bytes) -> tuple[int, bytes, str, Headers]:
    """``(status, JSON body, metrics domain label, extra headers)`` for a predict or batch
    body."""
    label = ""
    try:
        if path == PREDICT:
            req = parse_body(PredictRequest, body)
            result, label = await service.predictor.predict(req, service.control.current)
            return 200, orjson.dumps(result), label, None
        batch = parse_body(BatchPredictRequest, body)
        _check_batch(service, batch)
        results, label = await service.predictor.predict_many(
            batch.requests, service.control.current
        )
        return 200, orjson.dumps({"results": results}), label, None
    except ServiceError as exc:
        if isinstance(exc, NotFound):
            label = UNKNOWN_DOMAIN_LABEL
        return status_of(exc), orjson.dumps(exc.body()), label, headers_of(exc)


def _check_batch(service: Service, batch: BatchPredictRequest) -> None:
    settings = service.settings
    if len(batch.requests) > settings.max_batch_requests:
        raise Refused(
            f"the batch has {len(batch.requests)} requests, over the limit of "
            f"{settings.max_batch_requests} (MDLORA_MAX_BATCH_REQUESTS)",
        )
    total = sum(len(r.items or r.item_ids or ()) for r in batch.requests)
    if total > settings.max_batch_items:
        raise Refused(
            f"the batch has {total} items in all, over the limit of "
            f"{settings.max_batch_items} (MDLORA_MAX_BATCH_ITEMS)",
        )


class PredictFastPath:
    """Answers ``POST /predict``, ``/predict/batch`` and ``/feedback`` straight from ASGI (see
    module docstring), with the same body limits, errors and metrics as every other route."""

    def __init__(self, app: Any, fastapi_app: Any, metrics: ServiceMetrics) -> None:
        self.app, self.fastapi_app, self.metrics = app, fastapi_app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in FAST_PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        service = self.fastapi_app.state.service
        label = ""
        extra: Headers = None
        try:
            if service is None:
                raise Unavailable("the service is starting: no model loaded yet")
            if path == FEEDBACK:
                status, payload = await answer_feedback(service, scope, receive)
            else:
                body = await _read(scope, receive, service.settings.max_body_bytes)
                status, payload, label, extra = await answer(service, path, body)
        except ServiceError as exc:
            status, payload, extra = status_of(exc), orjson.dumps(exc.body()), headers_of(exc)
        except Exception:  # never leave the client without an answer
            log.exception("predict failed")
            status, payload = 500, orjson.dumps({"detail": "internal error (see the logs)"})
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(payload)).encode())]  # fmt: skip
        if extra:
            headers += [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()
            ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        self.metrics.observe(path, label, status, time.perf_counter() - start)


FAST_PATHS = (PREDICT, BATCH, FEEDBACK)


async def answer_feedback(service: Service, scope: Any, receive: Any) -> tuple[int, bytes]:
    """``POST /feedback`` (feedback traffic comes with the predict traffic: same fast path)."""
    limit = service.settings.feedback_max_body_bytes
    try:
        body = await _read(scope, receive, limit)
    except TooLarge:
        raise TooLarge(
            f"request body is over the limit of {limit} bytes (MDLORA_FEEDBACK_MAX_BODY_BYTES); "
            "send fewer events per call",
        ) from None
    return 200, orjson.dumps(await service.feedback.submit(parse_body(FeedbackBatch, body)))


async def _read(scope: Any, receive: Any, limit: int) -> bytes:
    """The whole body, refused (:class:`TooLarge`) as soon as it passes ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(int(value), limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(
        f"request body is {size} bytes or more, over the limit of {limit} bytes "
        "(MDLORA_MAX_BODY_BYTES); send fewer items per request",
    )


def json_body(schema: str) -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON request body of component ``schema``."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "unknown domain (MDLORA_UNKNOWN_DOMAIN=refuse)"},
    413: {"model": ErrorBody, "description": "body over MDLORA_MAX_BODY_BYTES"},
    422: {"model": ErrorBody, "description": "invalid body, or over an item limit"},
}


async def _route(request: Request, path: str) -> Response:
    service = get_service(request)
    body = await _read(request.scope, request.receive, service.settings.max_body_bytes)
    status, payload, label, headers = await answer(service, path, body)
    set_domain_label(request, label)
    return Response(payload, status, headers=headers, media_type="application/json")


@router.post(
    PREDICT,
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=json_body("PredictRequest"),
    summary="Score candidate items for one user in one domain",
)
async def predict(request: Request) -> Response:
    return await _route(request, PREDICT)


@router.post(
    BATCH,
    response_model=BatchPredictResponse,
    responses=ERRORS,
    openapi_extra=json_body("BatchPredictRequest"),
    summary="Score several predict requests in one call",
)
async def predict_batch(request: Request) -> Response:
    return await _route(request, BATCH)
