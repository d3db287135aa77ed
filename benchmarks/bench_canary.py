"""The canary phase of ``bench_service.py``: a 10% canary of one domain plus feedback traffic.

On the server the other phases ran against: registers a new version of the busiest domain as
a canary (``POST /v1/adapters`` with ``canary_percent``), then drives an open loop at the
given rate over requests whose users are all distinct (the same domain mix), in rounds that
alternate a canary slice (the rollout running; every answer of the canary's domain is read
and 10 of its items get a feedback event, clicks drawn from the served scores, sent on a
separate connection pool) and a steady slice (the rollout aborted, no feedback). Events are
sent as a front end's click logger sends them: batched, one ``POST /feedback`` every
``feedback_every`` seconds (0: one call per answer, the harshest case). It
reports the predict latencies of both (counted from when each request was due), the feedback
latencies, errors, the observed canary share among the domain's distinct users, and whether
any user was answered by both versions. The rollout is aborted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import orjson

FEEDBACK_ITEMS = 10


class Conn(Protocol):
    async def send(self, payload: bytes) -> tuple[int, bytes]: ...

    def close(self) -> None: ...


def canary_upload(config: bytes, weights: bytes, percent: float) -> tuple[bytes, str]:
    """The multipart body of a canary registration."""
    boundary = "mdloracanaryboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for field, name, data in (
            ("adapter_config", "adapter_config.json", config),
            ("adapter_model", "adapter_model.safetensors", weights),
        )
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="canary_percent"\r\n\r\n'
        f"{percent}\r\n".encode()
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def admin(method: str, path: str, token: str, body: bytes = b"", ctype: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def measure_canary(
    open_conn: Callable[[], Awaitable[Conn]],
    requests: list[dict[str, Any]],
    domain: str,
    division: str,
    package: tuple[bytes, bytes],
    token: str,
    rate: float,
    seconds: float,
    percent: float = 10.0,
    rounds: int = 4,
    send_feedback: bool = True,
    feedback_every: float = 0.1,
) -> dict[str, Any]:
    """Rounds alternating steady slices (no rollout) and canary slices (the rollout running,
    feedback sent), ``seconds`` of each in all, over the same requests: both see the same
    background load, which on a shared machine moves tail latencies more than anything."""
    ctl = await open_conn()
    body, ctype = canary_upload(*package, percent)
    status, answer = await ctl.send(admin("POST", "/v1/adapters", token, body, ctype))
    if status != 201:
        raise RuntimeError(f"canary registration answered {status}: {answer[:300]!r}")
    canary_version = orjson.loads(answer)["version"]
    rollout_path = f"/v1/rollouts/{division}/{domain}"
    start_body = orjson.dumps({"version": canary_version, "percent": percent})

    payloads = []
    for r in requests:
        data = orjson.dumps(r)
        head = (
            "POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        payloads.append(head.encode() + data)
    rng = np.random.default_rng(3)
    latencies: dict[bool, list[float]] = {False: [], True: []}
    fb_latencies: list[float] = []
    failures: dict[str, int] = {}
    seen: dict[tuple[int, Any], set[int]] = {}  # (round, user) -> versions that answered
    current_round = 0
    idle: list[Conn] = [await open_conn() for _ in range(8)]
    fb_idle: list[Conn] = [await open_conn() for _ in range(4)]
    fb_tasks: list[asyncio.Task[None]] = []
    pending: list[dict[str, Any]] = []  # events not sent yet (batched mode)
    fb_events = 0

    def fail(what: str) -> None:
        failures[what] = failures.get(what, 0) + 1

    async def feedback(events: list[dict[str, Any]]) -> None:
        nonlocal fb_events
        fb_events += len(events)
        data = orjson.dumps({"events": events})
        conn = fb_idle.pop() if fb_idle else await open_conn()
        t0 = time.perf_counter()
        head = (
            "POST /feedback HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        status, body = await conn.send(head.encode() + data)
        fb_latencies.append(time.perf_counter() - t0)
        if status != 200:
            fail(f"feedback HTTP {status}: {body[:120]!r}")
        fb_idle.append(conn)

    async def one(i: int, due: float, canary: bool) -> None:
        req = requests[i % len(requests)]
        conn = idle.pop() if idle else await open_conn()
        try:
            status, body = await conn.send(payloads[i % len(payloads)])
        except (OSError, asyncio.IncompleteReadError) as exc:
            fail(type(exc).__name__)
            return
        latencies[canary].append(time.perf_counter() - due)
        idle.append(conn)
        if status != 200:
            fail(f"HTTP {status}: {body[:120]!r}")
            return
        if not canary or req["domain"] != domain:
            return
        out = orjson.loads(body)
        user = (current_round, req["user"]["id"])
        seen.setdefault(user, set()).add(out["adapter_versions"][division])
        scores = out["scores"][:FEEDBACK_ITEMS]
        clicks = rng.random(len(scores)) < np.asarray(scores)
        events = [
            {"request_id": out["request_id"], "item_index": k, "clicked": bool(c)}
            for k, c in enumerate(clicks)
        ]
        if not send_feedback:
            return
        if feedback_every > 0:
            pending.extend(events)
        else:
            fb_tasks.append(asyncio.create_task(feedback(events)))

    def flush() -> None:
        while pending:  # at most 1000 events a call (MDLORA_FEEDBACK_MAX_EVENTS' default)
            batch = pending[:1000]
            del pending[:1000]
            fb_tasks.append(asyncio.create_task(feedback(batch)))

    async def flusher(stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), feedback_every)
            flush()

    async def open_loop(first: int, n: int, canary: bool) -> None:
        tasks = []
        stop = asyncio.Event()
        logger = asyncio.create_task(flusher(stop)) if feedback_every > 0 else None
        start = time.perf_counter()
        for k in range(n):
            due = start + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(first + k, due, canary)))
        await asyncio.gather(*tasks)
        stop.set()
        if logger is not None:
            await logger
        await asyncio.gather(*fb_tasks)

    n = max(1, int(rate * seconds / rounds))
    for k in range(rounds):
        current_round = k
        if k:  # a rollout of the same version again: the steady slice ran without one
            status, answer = await ctl.send(
                admin("POST", rollout_path, token, start_body, "application/json")
            )
            if status != 200:
                fail(f"start HTTP {status}: {answer[:120]!r}")
        await asyncio.sleep(0.2)  # the snapshot swap settles (as the swap phase's SETTLE)
        await open_loop(2 * k * n, n, True)
        status, answer = await ctl.send(admin("GET", rollout_path, token))
        rollout = orjson.loads(answer) if status == 200 else {}
        status, _ = await ctl.send(admin("POST", f"{rollout_path}/abort", token))
        if status != 200:
            fail(f"abort HTTP {status}")
        await asyncio.sleep(0.2)
        await open_loop((2 * k + 1) * n, n, False)
    for c in [ctl, *idle, *fb_idle]:
        c.close()

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")

    users = len(seen)
    on_canary = sum(1 for v in seen.values() if canary_version in v)
    share = 100.0 * on_canary / max(users, 1)
    return {
        "p50_ms": pct(latencies[True], 50),
        "p99_ms": pct(latencies[True], 99),
        "steady_p50_ms": pct(latencies[False], 50),
        "steady_p99_ms": pct(latencies[False], 99),
        "feedback_p99_ms": pct(fb_latencies, 99),
        "feedback_calls": len(fb_latencies),
        "feedback_events": fb_events,
        "feedback_every_s": feedback_every,
        "requests": len(latencies[True]) + len(latencies[False]),
        "domain_users": users,
        "canary_share": share,
        "canary_share_error": abs(share - percent),
        # within one rollout (each round starts a new one, with a new salt)
        "users_on_both_versions": sum(1 for v in seen.values() if len(v) > 1),
        "feedback_window": rollout.get("feedback", {}),
        "errors": sum(failures.values()),
        "failures": failures,
    }
