"""Import-time defaults of the ``mdlora`` package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "import mdlora, os; print(os.environ.get('GOMP_SPINCOUNT', '-'))"


def _spincount(**env: str) -> str:
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, cwd=REPO,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "10000"),  # the short spin default, set before torch loads OpenMP
        ({"GOMP_SPINCOUNT": "300000"}, "300000"),  # the user's value wins
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "-"),  # an explicit wait policy is left alone
    ],
)
def test_openmp_spin_default(env: dict[str, str], expected: str) -> None:
    assert _spincount(**env) == expected
