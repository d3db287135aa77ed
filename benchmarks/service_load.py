"""The service benchmark's load generator: a lean asyncio HTTP/1.1 client over keep-alive
connections (closed and open loops, latency from the time a request was due), the server
subprocess, the admin swapper and the /metrics scrapes, for ``bench_service.py``
(``bench_canary.py`` drives any connection with a ``send``, e.g. this module's)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin-token"


def http_request(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection sending pre-encoded requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, payload: bytes) -> tuple[int, bytes]:
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


class Stats:
    """Latencies (seconds) with the time each request was due, and error count."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.due: list[float] = []
        self.errors = 0
        self.failures: dict[str, int] = {}
        self.start = time.perf_counter()
        self.end = self.start

    def fail(self, what: str) -> None:
        self.errors += 1
        self.failures[what] = self.failures.get(what, 0) + 1

    def rps(self) -> float:
        return len(self.latencies) / max(self.end - self.start, 1e-9)


def percentiles(latencies: list[float] | np.ndarray) -> tuple[float, float]:
    lat = np.asarray(latencies) * 1000
    if lat.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


async def closed_loop(port: int, payloads: list[bytes], concurrency: int, seconds: float) -> Stats:
    stats = Stats()
    deadline = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        conn = await Connection.open(port)
        i = k
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                status, _ = await conn.send(payloads[i % len(payloads)])
                stats.latencies.append(time.perf_counter() - t0)
                stats.due.append(t0)
                if status != 200:
                    stats.fail(f"HTTP {status}")
                i += concurrency
        finally:
            conn.close()

    stats.start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    stats.end = time.perf_counter()
    return stats


async def open_loop(port: int, payloads: list[bytes], rate: float, seconds: float) -> Stats:
    """Requests at a fixed rate; latency counted from the time each was due (no coordinated
    omission). Connections come from a pool; more open when all are busy."""
    stats = Stats()
    idle: list[Connection] = [await Connection.open(port) for _ in range(8)]
    tasks = []
    interval = 1.0 / rate

    async def one(i: int, due: float) -> None:
        conn = idle.pop() if idle else await Connection.open(port)
        try:
            status, body = await conn.send(payloads[i % len(payloads)])
        except (OSError, asyncio.IncompleteReadError) as exc:
            stats.fail(type(exc).__name__)
            return
        stats.latencies.append(time.perf_counter() - due)
        stats.due.append(due)
        if status != 200:
            stats.fail(f"HTTP {status}: {body[:120]!r}")
        idle.append(conn)

    stats.start = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = stats.start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    stats.end = time.perf_counter()
    for c in idle:
        c.close()
    return stats


def multipart(files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "mdlorabenchboundary"
    parts = []
    for field, (name, data) in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(
        parts
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Swapper:
    """Registers a new version of one domain's adapter, then rolls it back, over and over,
    with quiet gaps in between; remembers when each change was in progress."""

    SETTLE = 0.1  # seconds after a change's answer still counted as "during the change"

    def __init__(self, port: int, packages: list[tuple[bytes, bytes]], gap: float = 0.6) -> None:
        self.port, self.packages, self.gap = port, packages, gap
        self.windows: list[tuple[float, float]] = []
        self.log: list[str] = []
        self.errors = 0

    async def _call(self, conn: Connection, what: str, payload: bytes, ok: int) -> None:
        t0 = time.perf_counter()
        status, body = await conn.send(payload)
        t1 = time.perf_counter()
        self.windows.append((t0, t1 + self.SETTLE))
        self.log.append(f"{what} {status} {1000 * (t1 - t0):.0f} ms")
        if status != ok:
            self.errors += 1
            self.log.append(f"  unexpected answer: {body[:200]!r}")

    async def run(self, stop: asyncio.Event) -> None:
        conn = await Connection.open(self.port)
        auth = f"Authorization: Bearer {TOKEN}\r\n"
        k = 0
        while not stop.is_set():
            await asyncio.sleep(self.gap)
            config, weights = self.packages[k % len(self.packages)]
            body, ctype = multipart(
                {
                    "adapter_config": ("adapter_config.json", config),
                    "adapter_model": ("adapter_model.safetensors", weights),
                }
            )
            head = (
                f"POST /v1/adapters HTTP/1.1\r\nHost: bench\r\n{auth}Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            await self._call(conn, "register", head.encode() + body, 201)
            await asyncio.sleep(self.gap)
            rollback = (
                f"POST /v1/adapters/occupation/4/rollback HTTP/1.1\r\nHost: bench\r\n"
                f"{auth}Content-Length: 0\r\n\r\n"
            )
            await self._call(conn, "rollback", rollback.encode(), 200)
            k += 1
        conn.close()

    def during(self, due: float) -> bool:
        return any(a <= due <= b for a, b in self.windows)


@contextlib.contextmanager
def server(
    artifact: Path, port: int, env_extra: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDLORA_")}
    env.update({"MDLORA_ADMIN_TOKEN": TOKEN, "MDLORA_REGISTRY": "local", **env_extra})
    code = (
        "from pathlib import Path; from mdlora.cli.service import serve_artifact; "
        f"serve_artifact(Path({str(artifact)!r}), '127.0.0.1', {port})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(coro: Any) -> Any:
    """Run the load generator on uvloop when it is installed (a leaner client)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(port: int) -> list[str]:
    conn = await Connection.open(port)
    _, body = await conn.send(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
    conn.close()
    return body.decode().splitlines()


async def server_latency(port: int) -> dict[float, float]:
    """Cumulative count per histogram bound of the service's own /predict latency."""
    out: dict[float, float] = {}
    for line in await scrape(port):
        if line.startswith("mdlora_request_latency_seconds_bucket{") and 'route="/predict"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def server_p99_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """Upper bound of the service-side p99 between two scrapes (histogram resolution)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    return next(1000 * b for b, c in zip(bounds, counts, strict=True) if c >= 0.99 * counts[-1])


async def model_calls(port: int) -> tuple[float, float]:
    """``(rows, calls)`` of the service's model calls so far, from /metrics."""
    found = {}
    for line in await scrape(port):
        for key in ("mdlora_model_batch_rows_sum", "mdlora_model_batch_rows_count"):
            if line.startswith(key + " "):
                found[key] = float(line.split()[1])
    return found.get("mdlora_model_batch_rows_sum", 0.0), found.get(
        "mdlora_model_batch_rows_count", 0.0
    )
