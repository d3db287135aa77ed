"""The rollout admin API under ``/v1/rollouts`` (same bearer token as ``/v1/adapters``).

Start a canary of a registered version, read its status and feedback, promote or abort it.
``/v1/rollouts/{domain}`` (one path segment) names a domain of the primary division.
A canary can also start with the registration itself: ``POST /v1/adapters`` with the form
field ``canary_percent``. See :mod:`mdlora.service.rollout` and :mod:`mdlora.service.feedback`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from mdlora.service.api.admin import ERRORS, require_admin
from mdlora.service.api.deps import get_service, parse_body
from mdlora.service.errors import Refused

router = APIRouter(
    prefix="/v1/rollouts",
    tags=["rollouts"],
    dependencies=[Depends(require_admin)],
    responses={**ERRORS, 409: {"description": "no running rollout, or another one runs"}},
)


class RolloutStart(BaseModel):
    """Serve registered ``version`` to ``percent`` of the domain's users."""

    model_config = ConfigDict(extra="forbid")
    version: StrictInt = Field(ge=1, description="a registered version of the domain")
    percent: float = Field(ge=0, le=100, description="share of the users on the canary, 0-100")


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500, description="kept in the rollout status")


def _key(request: Request, division: str | None, domain: str) -> tuple[str, str]:
    if division is None:
        division = get_service(request).control.current.divisions[0]
    return division, domain


async def _body(request: Request, model: type[Any], required: bool) -> Any:
    body = await request.body()
    if not body.strip():
        if required:
            raise Refused('a JSON body is required: {"version": N, "percent": P}')
        return model()
    return parse_body(model, body)


@router.get("", summary="Every domain's rollout (running or last decided)")
async def list_rollouts(request: Request) -> dict[str, Any]:
    control = get_service(request).control
    return {"rollouts": control.rollouts.listing(), "registry": control.registry_status}


async def _status(request: Request, division: str | None, domain: str) -> dict[str, Any]:
    service = get_service(request)
    return await service.feedback.status(_key(request, division, domain))


async def _start(request: Request, division: str | None, domain: str) -> dict[str, Any]:
    service = get_service(request)
    body: RolloutStart = await _body(request, RolloutStart, True)
    control = service.control
    key = _key(request, division, domain)
    await control.run(control.rollouts.start, key, body.version, body.percent)
    return await service.feedback.status(key)


async def _decide(
    request: Request, division: str | None, domain: str, decision: str
) -> dict[str, Any]:
    service = get_service(request)
    body: Decision = await _body(request, Decision, False)
    control = service.control
    key = _key(request, division, domain)
    await control.run(control.rollouts.decide, key, decision, "admin", body.reason)
    return await service.feedback.status(key)


# the one-segment forms name a primary-division domain; promote / abort come first so that
# "/{domain}/promote" is not read as the start of a canary of domain "promote"
@router.post("/{domain}/promote", summary="Promote a primary-division domain's canary")
async def promote_primary(request: Request, domain: str) -> dict[str, Any]:
    return await _decide(request, None, domain, "promote")


@router.post("/{domain}/abort", summary="Abort a primary-division domain's canary")
async def abort_primary(request: Request, domain: str) -> dict[str, Any]:
    return await _decide(request, None, domain, "abort")


@router.get("/{division}/{domain}", summary="A rollout's state, feedback statistics and guard")
async def status(request: Request, division: str, domain: str) -> dict[str, Any]:
    return await _status(request, division, domain)


@router.post(
    "/{division}/{domain}",
    summary="Start a canary of a registered version (or change a running one's share)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": RolloutStart.model_json_schema()}},
        }
    },
)
async def start(request: Request, division: str, domain: str) -> dict[str, Any]:
    return await _start(request, division, domain)


@router.post("/{division}/{domain}/promote", summary="The canary becomes the active version")
async def promote(request: Request, division: str, domain: str) -> dict[str, Any]:
    return await _decide(request, division, domain, "promote")


@router.post("/{division}/{domain}/abort", summary="Everyone back on the active version")
async def abort(request: Request, division: str, domain: str) -> dict[str, Any]:
    return await _decide(request, division, domain, "abort")


@router.get("/{domain}", summary="A primary-division domain's rollout")
async def status_primary(request: Request, domain: str) -> dict[str, Any]:
    return await _status(request, None, domain)


@router.post("/{domain}", summary="Start a canary in the primary division")
async def start_primary(request: Request, domain: str) -> dict[str, Any]:
    return await _start(request, None, domain)
