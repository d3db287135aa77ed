"""``POST /feedback``: outcomes observed by the front end (no admin token; own limits).

Body ``{"events": [{"request_id": "...", "item_id": 1193, "clicked": true}, ...]}`` (or
``item_index``, the item's position in the predict request). All or nothing: see
:mod:`mdlora.service.feedback`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from mdlora.service.api.deps import get_service, parse_body
from mdlora.service.api.predict import json_body
from mdlora.service.feedback import FeedbackBatch
from mdlora.service.schemas import ErrorBody

router = APIRouter(tags=["feedback"])


@router.post(
    "/feedback",
    summary="Report clicks on items of earlier answers (joined to the version that served them)",
    responses={
        404: {"model": ErrorBody, "description": "unknown or expired request id; nothing recorded"},
        413: {"model": ErrorBody, "description": "body over MDLORA_FEEDBACK_MAX_BODY_BYTES"},
        422: {
            "model": ErrorBody,
            "description": "invalid body, an item its answer did not score, or over "
            "MDLORA_FEEDBACK_MAX_EVENTS; nothing recorded",
        },
        503: {"model": ErrorBody, "description": "the shared feedback store is unavailable"},
    },
    openapi_extra=json_body("FeedbackBatch"),
)
async def feedback(request: Request) -> dict[str, Any]:
    service = get_service(request)
    batch = parse_body(FeedbackBatch, await request.body())
    return await service.feedback.submit(batch)
