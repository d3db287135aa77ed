"""``/healthz`` (alive), ``/readyz`` (model loaded; registry ok or degraded), ``/metrics``."""

from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    response_model_exclude_none=True,
    summary="Liveness: the process answers",
)
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "no model loaded yet"}},
    summary="Readiness: a model is loaded (registry reachable: ready; not: degraded)",
)
async def readyz(request: Request) -> Response:
    service = getattr(request.app.state, "service", None)
    if service is None:
        return Response(orjson.dumps({"status": "starting"}), 503, media_type="application/json")
    control = service.control
    ok = await asyncio.to_thread(control.check_registry)
    snap = control.current
    body = {
        "status": "ready" if ok else "degraded",
        "registry": "ok" if ok else f"unavailable: {control.registry_error}",
        "registry_version": snap.registry_version,
        "model_version": snap.info.model_version,
        "snapshot_age_seconds": time.time() - snap.created_at,
    }
    # Degraded still serves the loaded snapshot: keep the replica in the load balancer.
    return Response(orjson.dumps(body), 200, media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
