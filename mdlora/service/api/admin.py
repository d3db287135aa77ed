"""The admin API under ``/v1``: adapters (register, list, show, roll back, remove) and models.

Every route needs ``Authorization: Bearer <MDLORA_ADMIN_TOKEN>`` (compared in constant time).
Without a configured token the admin API is off (403), unless ``MDLORA_DEV_MODE=true``.
Writes run on the control plane's builder thread; see :mod:`mdlora.service.control` for the order
(validate, build, commit, swap) that keeps a refused or failed change from changing anything.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mdlora.formats.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
)
from mdlora.service.api.deps import get_service
from mdlora.service.errors import Forbidden, ServiceError, TooLarge, Unauthenticated
from mdlora.service.schemas import AdapterChange, AdapterInfo, AdapterList, ErrorBody

bearer = HTTPBearer(auto_error=False, description="MDLORA_ADMIN_TOKEN")


def require_admin(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> None:
    settings = get_service(request).settings
    if settings.admin_token is None:
        if settings.dev_mode:
            return
        raise Forbidden(
            "the admin API is disabled: set MDLORA_ADMIN_TOKEN "
            "(or MDLORA_DEV_MODE=true on a development machine)",
        )
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if credentials is None or not hmac.compare_digest(given, expected):
        raise Unauthenticated(
            "missing or wrong admin token: send 'Authorization: Bearer <MDLORA_ADMIN_TOKEN>'"
        )


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    403: {"model": ErrorBody, "description": "admin API disabled (no token configured)"},
    404: {"model": ErrorBody, "description": "no such adapter"},
    503: {"model": ErrorBody, "description": "registry unavailable; nothing changed"},
}
router = APIRouter(
    prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin)], responses=ERRORS
)


async def _read_upload(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{what} is over the {limit}-byte limit (MDLORA_MAX_ADAPTER_BYTES)")
    return data


@router.post(
    "/adapters",
    status_code=201,
    response_model=AdapterChange,
    responses={
        400: {
            "model": ErrorBody,
            "description": "the multipart body cannot be parsed (Invalid multipart data, "
            "Missing boundary in multipart)",
        },
        409: {"model": ErrorBody},
        413: {"model": ErrorBody},
        422: {"model": ErrorBody, "description": "package refused; reason in detail"},
    },
    summary="Register a domain adapter (the package `mdlora add-domain` writes)",
    description="201 with the new version; 200 with action `unchanged` when the package is "
    "byte for byte the domain's active version already (a retried upload is safe).",
)
async def register_adapter(
    request: Request,
    response: Response,
    adapter_config: UploadFile = File(description=ADAPTER_CONFIG),
    adapter_model: UploadFile = File(description=ADAPTER_WEIGHTS),
    canary_percent: float | None = Form(
        None,
        ge=0,
        le=100,
        description="register as a canary: this share (%) of the domain's users get the new "
        "version, the others keep the active one, until promoted or aborted (/v1/rollouts)",
    ),
) -> dict[str, Any]:
    service = get_service(request)
    limit = service.settings.max_adapter_bytes
    try:
        config = await _read_upload(adapter_config, 1 << 20, ADAPTER_CONFIG)
        weights = await _read_upload(adapter_model, limit, ADAPTER_WEIGHTS)
    except ServiceError:
        service.control.metrics.adapter_loads.labels("refused").inc()
        raise
    out = await service.control.run(service.control.register, config, weights, canary_percent)
    if out.get("action") == "unchanged":
        response.status_code = 200
    return out


@router.get("/adapters", response_model=AdapterList, summary="List adapters and their versions")
async def list_adapters(request: Request) -> dict[str, Any]:
    control = get_service(request).control
    return {
        "adapters": control.listing(),
        "registry_version": control.known_state.version,
        "registry": control.registry_status,
    }


@router.get(
    "/adapters/{division}/{domain}",
    response_model=AdapterInfo,
    summary="Show one domain's adapter versions",
)
async def show_adapter(request: Request, division: str, domain: str) -> dict[str, Any]:
    return get_service(request).control.describe((division, domain))


@router.post(
    "/adapters/{division}/{domain}/rollback",
    response_model=AdapterChange,
    responses={409: {"model": ErrorBody}},
    summary="Roll a domain back to its previous version",
)
async def rollback_adapter(request: Request, division: str, domain: str) -> dict[str, Any]:
    control = get_service(request).control
    return await control.run(control.rollback, division, domain)


@router.delete(
    "/adapters/{division}/{domain}",
    response_model=AdapterChange,
    responses={409: {"model": ErrorBody}},
    summary="Remove a registered domain (artifact domains return to their trained version)",
)
async def remove_adapter(request: Request, division: str, domain: str) -> dict[str, Any]:
    control = get_service(request).control
    return await control.run(control.remove, division, domain)


@router.get("/models", summary="Describe the serving snapshot")
async def models(request: Request) -> dict[str, Any]:
    service = get_service(request)
    return {**service.control.current.describe(), **service.describe()}
