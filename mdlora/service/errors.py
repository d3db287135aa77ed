"""Why the service cannot serve a request, as domain errors with no transport in them.

Everything below the API raises one of the kinds here; only :mod:`mdlora.service.api.errors`
turns a kind into an HTTP status and headers. An error's answer body is
``{"detail": message, **extra}``: the message says what to fix, ``extra`` holds structured
fields (the known domains, the failing index, ...). ``retry_after`` (seconds) says when a
retry may succeed, where something knows.
"""

from __future__ import annotations

from typing import Any, TypeVar

E = TypeVar("E", bound="ServiceError")


class ServiceError(Exception):
    """A request the service cannot serve (the base: raise one of the kinds below)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message, self.retry_after, self.extra = message, retry_after, extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, **self.extra}

    def within(self: E, where: str, **extra: Any) -> E:
        """The same kind of error, located: ``"requests[3]: <message>"`` with ``extra`` fields
        first in the body."""
        return type(self)(
            f"{where}: {self.message}", retry_after=self.retry_after, **{**extra, **self.extra}
        )


class BadRequest(ServiceError):
    """The request could not be read at all (e.g. its body stopped half way)."""


class Unauthenticated(ServiceError):
    """Missing or wrong credentials."""


class Forbidden(ServiceError):
    """The caller may not do this here (e.g. the admin API is switched off)."""


class NotFound(ServiceError):
    """It names something the service does not have (domain, adapter, request id, rollout)."""


class Conflict(ServiceError):
    """Understood, but the current state does not allow it (a rollout runs, nothing to roll
    back to, ...)."""


class TooLarge(ServiceError):
    """A body or upload over its byte limit."""


class Refused(ServiceError):
    """Understood and refused: invalid input, over an item limit, an adapter that fails its
    checks."""


class ModelFault(ServiceError):
    """The served model failed the request (e.g. non-finite scores): not the caller's fault."""


class Unavailable(ServiceError):
    """Something the request needs (registry, Redis, a loaded model) is not there now: retry."""
