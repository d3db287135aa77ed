"""Shared helpers of the service tests: demo artifacts, the core's own scores, live servers,
private Redis servers."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from mdlora.formats.adapter_package import (
    AdapterPackage,
    adapter_package_bytes,
)
from mdlora.formats.artifact import load_artifact
from mdlora.formats.encoder import FeatureEncoder
from mdlora.models.features import EncodedBatch

TOKEN = "test-admin-token"
ADMIN_TOKEN = SecretStr(TOKEN)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHARED_REDIS = "redis://127.0.0.1:6379/0"


def core_scores(
    artifact: Path,
    records: Sequence[Mapping[str, Any]],
    stage: str | None = None,
    oov: Sequence[str] = (),
) -> np.ndarray:
    """What the models core scores for raw ``records`` (the reference the service must match).

    ``stage``: score in that stage instead of the artifact's; ``oov``: sparse columns to set
    to the out-of-vocabulary id after encoding.
    """
    art = load_artifact(artifact)
    assert art.encoder is not None
    encoder = FeatureEncoder.from_dict(art.encoder)
    arrays = encoder.encode_records(records)
    for col in oov:
        arrays["sparse"][:, encoder.sparse_columns.index(col)] = 0
    if stage is not None:
        art.model.set_stage(stage)
    batch = EncodedBatch(
        sparse=torch.from_numpy(arrays["sparse"]),
        dense=torch.from_numpy(arrays["dense"]),
        domains=torch.from_numpy(arrays["domains"]),
        multi_hot=None if arrays["multi_hot"] is None else torch.from_numpy(arrays["multi_hot"]),
    )
    with torch.inference_mode():
        return art.model.score_batch(batch).numpy()


def upload_files(pkg: AdapterPackage) -> dict[str, tuple[str, bytes]]:
    config, weights = adapter_package_bytes(pkg)
    return {
        "adapter_config": ("adapter_config.json", config),
        "adapter_model": ("adapter_model.safetensors", weights),
    }


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_reachable(url: str = SHARED_REDIS) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def unique_prefix() -> str:
    return f"mdlora-test-{uuid.uuid4().hex[:12]}"


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (never FLUSHALL: the Redis may be shared)."""
    import redis

    with contextlib.suppress(redis.RedisError, OSError):
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def private_redis(
    port: int | None = None, data_dir: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a spare port (never the shared one on 6379)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    port = port or free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if data_dir is not None:
        args += ["--dir", str(data_dir), "--appendonly", "yes"]
    else:
        args += ["--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not redis_reachable(url):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def wait_until(predicate: Any, timeout: float, interval: float = 0.02) -> float:
    """Seconds until ``predicate()`` is true; raises AssertionError after ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def get_json(url: str, path: str, **kw: Any) -> Any:
    return httpx.get(url + path, timeout=10, **kw).json()
