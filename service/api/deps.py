"""What routes need from the app: the running :class:`~service.app.Service`, body parsing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.app import Service

M = TypeVar("M", bound=BaseModel)


def get_service(request: Request) -> Service:
    """The app's running service (set by the lifespan; replaceable in tests)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ServiceError(503, "the service is starting: no model loaded yet")
    return service


def set_domain_label(request: Request, label: str) -> None:
    """Tell the metrics middleware which domain this request was for."""
    info = request.scope.get("mdlora")
    if info is not None:
        info["domain"] = label


def parse_body(model: type[M], body: bytes) -> M:
    """Validate a JSON body; 422 with pydantic's errors (location, message) otherwise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        loc = errors[0]["loc"] if errors else ()
        msg = errors[0]["msg"] if errors else "invalid"
        where = ".".join(str(p) for p in loc) or "body"
        raise ServiceError(
            422,
            f"invalid request body at {where}: {msg}{_hint(errors[0] if errors else None)}",
            errors=_jsonable(errors),
        ) from None


def _hint(error: Any) -> str:
    """A pointer for the commonest mistake: feature values beside ``id`` instead of inside
    ``features``."""
    if not error or error.get("type") != "extra_forbidden":
        return ""
    loc = [str(p) for p in error.get("loc", ())]
    if len(loc) >= 2 and loc[-2] == "user":
        return f" (feature values go under user.features: {{\"{loc[-1]}\": ...}})"
    if len(loc) >= 3 and loc[-3] == "items":
        return f" (feature values go under the item's features: {{\"{loc[-1]}\": ...}})"
    return ""


def _jsonable(errors: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg")),
            "type": str(e.get("type")),
        }
        for e in errors
    ]
