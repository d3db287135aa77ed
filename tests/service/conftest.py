"""Fixtures of the service tests: demo artifacts built once per session, Redis namespaces."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.service.demo import build_demo_artifact
from tests.service.helpers import (
    SHARED_REDIS,
    copy_artifact,
    delete_prefix,
    redis_reachable,
    unique_prefix,
)

DEMO = {
    "mlora": {"method": "mlora", "division": "age"},
    "moe": {"method": "moe", "division": "gender", "experts_per_domain": 2},
    "multilora": {"method": "multilora", "division": "age_group"},
    "base": {"method": "base", "division": "age"},
}


@pytest.fixture(scope="session")
def demo_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-artifacts")
    return {name: build_demo_artifact(root / name, **kw) for name, kw in DEMO.items()}  # type: ignore[arg-type]


@pytest.fixture
def make_artifact(demo_artifacts: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of a demo artifact (the local registry writes into it)."""
    count = 0

    def make(method: str = "mlora") -> Path:
        nonlocal count
        count += 1
        return copy_artifact(demo_artifacts[method], tmp_path / f"{method}-{count}")

    return make


@pytest.fixture
def redis_url() -> str:
    if not redis_reachable(SHARED_REDIS):
        pytest.skip("no Redis at 127.0.0.1:6379 (start redis-server to run this test)")
    return SHARED_REDIS


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; every key under it is deleted afterwards."""
    prefix = unique_prefix()
    yield prefix
    delete_prefix(redis_url, prefix)
