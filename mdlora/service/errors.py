"""The one error type the service raises for a request it cannot serve."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Answered as HTTP ``status`` with ``{"detail": message, **extra}``; the message says what
    to fix."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, **self.extra}
