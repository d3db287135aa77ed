"""``/healthz`` (alive), ``/readyz`` (model loaded; registry ok or degraded), ``/metrics``."""

from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mdlora.service.schemas import Health

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
    summary="Readiness: a model is loaded (ready; degraded: registry unreachable or behind "
    "this replica (lost its data), or a registered adapter could not be loaded)",
)
async def readyz(request: Request) -> Response:
    service = getattr(request.app.state, "service", None)
    if service is None:
        return Response(orjson.dumps({"status": "starting"}), 503, media_type="application/json")
    control = service.control
    ok = await asyncio.to_thread(control.check_registry)
    snap = control.current
    unloaded = dict(control.unloaded)
    body = {
        "status": "ready" if ok and not unloaded else "degraded",
        "registry": "ok" if ok else control.registry_status,
        "adapters": (
            "not loaded: "
            + "; ".join(f"{k[0]}/{k[1]} {why}" for k, why in sorted(unloaded.items()))
            if unloaded
            else None
        ),
        "registry_version": snap.registry_version,
        "model_version": snap.info.model_version,
        "snapshot_age_seconds": time.time() - snap.created_at,
    }
    # Degraded still serves the loaded snapshot: keep the replica in the load balancer.
    body = {k: v for k, v in body.items() if v is not None}
    return Response(orjson.dumps(body), 200, media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
