"""The service's errors as HTTP answers: the one place a kind of :mod:`mdlora.service.errors`
becomes a status code and headers.

Used by the app's exception handler, the predict fast path and the middlewares, so that every
route answers the same kind the same way.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.responses import Response

from mdlora.service.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    ModelFault,
    NotFound,
    Refused,
    ServiceError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

#: the status of every kind (a kind not listed answers as its nearest listed base class)
STATUS: dict[type[ServiceError], int] = {
    ServiceError: 500,
    BadRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Refused: 422,
    ModelFault: 500,
    Unavailable: 503,
}

#: headers every answer of a kind carries
HEADERS: dict[type[ServiceError], dict[str, str]] = {
    Unauthenticated: {"WWW-Authenticate": "Bearer"},
}


def status_of(exc: ServiceError | type[ServiceError]) -> int:
    """The HTTP status ``exc`` (an error or a kind) is answered with."""
    kind = exc if isinstance(exc, type) else type(exc)
    for cls in kind.__mro__:
        if cls in STATUS:
            return STATUS[cls]
    raise TypeError(f"{kind.__name__} is not a ServiceError")


def headers_of(exc: ServiceError) -> dict[str, str] | None:
    """The headers of ``exc``'s answer (Retry-After when it says when to retry), or None."""
    headers: dict[str, str] = {}
    for cls in reversed(type(exc).__mro__):
        headers.update(HEADERS.get(cls, {}))
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(0, math.ceil(exc.retry_after)))
    return headers or None


def json_error(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    """A JSON error answer."""
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def error_response(exc: ServiceError) -> Response:
    """``exc`` as its HTTP answer: status of its kind, ``{"detail": ..., **extra}``, headers."""
    return json_error(status_of(exc), exc.body(), headers_of(exc))


def not_allowed(method: str, path: str, allowed: list[str]) -> Response:
    """405 naming every method the path answers (also in ``Allow``)."""
    methods = ", ".join(allowed)
    return json_error(
        405, {"detail": f"{method} is not allowed on {path}; use {methods}"}, {"Allow": methods}
    )
