"""The device every device-sensitive test runs on: one fixture, CPU in CI, CUDA where present.

``device`` is parametrised over ``test_devices()``: the CPU always, plus ``cuda`` when torch
sees a GPU, so the same test body runs on both (ids ``[cpu]`` / ``[cuda]``).
``MDLORA_TEST_DEVICE`` narrows it: ``cpu``, ``cuda`` (a GPU machine that has already run the
CPU half), or ``all`` (the default). Asking for ``cuda`` where there is none skips those tests
rather than passing them on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

ENV = "MDLORA_TEST_DEVICE"


def test_devices() -> list[str]:
    wanted = os.environ.get(ENV, "all").strip().lower() or "all"
    if wanted not in ("all", "cpu", "cuda"):
        raise pytest.UsageError(f"{ENV} must be cpu, cuda or all, got {wanted!r}")
    if wanted == "cpu":
        return ["cpu"]
    if wanted == "cuda":
        return ["cuda"]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=test_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    """The torch device of this run of the test (see the module docstring)."""
    name = str(request.param)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{ENV}=cuda but torch sees no GPU here")
    return torch.device(name)
