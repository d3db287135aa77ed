"""What routes need from the app: the running :class:`~service.app.Service`, body parsing."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from mdlora.service.errors import Refused, Unavailable

if TYPE_CHECKING:
    from mdlora.service.app import Service

M = TypeVar("M", bound=BaseModel)


def get_service(request: Request) -> Service:
    """The app's running service (set by the lifespan; replaceable in tests)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("the service is starting: no model loaded yet")
    return service


def set_domain_label(request: Request, label: str) -> None:
    """Tell the metrics middleware which domain this request was for."""
    info = request.scope.get("mdlora")
    if info is not None:
        info["domain"] = label


def parse_body(model: type[M], body: bytes) -> M:
    """Validate a JSON body; otherwise :class:`Refused` with pydantic's errors (location,
    message)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        loc = errors[0]["loc"] if errors else ()
        msg = errors[0]["msg"] if errors else "invalid"
        where = ".".join(str(p) for p in loc) or "body"
        union = _union_error(exc.errors(include_url=False, include_context=False))
        detail = (
            f"invalid request body at {union}"
            if union
            else f"invalid request body at {where}: {msg}{_hint(errors[0] if errors else None)}"
        )
        raise Refused(detail, errors=_jsonable(errors)) from None


_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}


def _kind(tag: Any) -> str | None:
    """What a union member's tag in an error location stands for (None: not a tag)."""
    if not isinstance(tag, str):
        return None
    return _KINDS.get(tag) or ("a list" if tag.startswith("list[") else None)


def _union_error(errors: list[Any]) -> str | None:
    """One line for a value that matched no member of a union (pydantic reports one error
    per member, the first of which, "should be a valid string", misleads for 196.5)."""
    if not errors or len(errors[0]["loc"]) < 2 or _kind(errors[0]["loc"][-1]) is None:
        return None
    base = tuple(errors[0]["loc"][:-1])
    kinds = [
        k
        for e in errors
        if tuple(e["loc"][:-1]) == base
        and e.get("type") != "extra_forbidden"
        and (k := _kind(e["loc"][-1])) is not None
    ]
    if len(kinds) < 2:  # not a union (e.g. an unknown key named "str")
        return None
    shown = json.dumps(errors[0].get("input"), default=str)[:80]  # as the client wrote it
    where = ".".join(str(p) for p in base)
    return f"{where}: expected {' or '.join(dict.fromkeys(kinds))}, got {shown}"


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
