"""Artifacts and packages are readable by other users (the image serves them as uid 10001)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mdlora.formats.adapter_package import write_adapter_package
from mdlora.formats.artifact import save_artifact
from mdlora.formats.fileio import atomic_write, share_tree, staging_dir
from tests.service.demo import demo_adapter, demo_model


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_artifact_and_package_files_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    model, data = demo_model("moe", "gender", experts_per_domain=2)
    art = save_artifact(model, tmp_path / "art", encoder=data.encoder.to_dict())
    pkg = write_adapter_package(demo_adapter(model, "gender", "X"), tmp_path / "pkg")
    assert stat.S_IMODE(art.stat().st_mode) == 0o755
    for root in (art, pkg):
        modes = _modes(root)
        assert modes and all(m in (0o644, 0o755) for m in modes.values()), modes
        assert all(m == 0o755 for k, m in modes.items() if (root / k).is_dir())


def test_helpers_give_plain_modes(tmp_path: Path, umask_022: None) -> None:
    atomic_write(tmp_path / "a.bin", b"x", durable=True)
    assert (tmp_path / "a.bin").read_bytes() == b"x"
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    d = staging_dir(tmp_path / "target")
    assert d.parent == tmp_path and stat.S_IMODE(d.stat().st_mode) == 0o755
    (d / "f").write_bytes(b"")
    os.chmod(d / "f", 0o600)
    share_tree(d)
    assert stat.S_IMODE((d / "f").stat().st_mode) == 0o644
    os.umask(0o077)  # a stricter umask is respected, not widened
    atomic_write(tmp_path / "b.bin", b"y")
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o600
