"""Import-time defaults of the ``mdlora`` package."""

from __future__ import annotations

import ast
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


#: imported outside try/except but only where the package already knows they are there
OPTIONAL = {"triton": "models/grouped.py, after its own guarded import (CUDA torch brings it)"}


def _optional(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside ``try: ... except ImportError`` (optional extras)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        if any("ImportError" in n or "ModuleNotFoundError" in n for n in names):
            for sub in node.body:
                lines.update(n.lineno for n in ast.walk(sub) if isinstance(n, ast.stmt))
    return lines


def test_every_module_the_package_imports_is_a_declared_dependency() -> None:
    """A fresh ``pip install mdlora`` (no dev extras) must import everything its commands
    use: every third-party import in ``mdlora/`` outside ``try/except ImportError`` comes
    from a distribution in ``[project] dependencies``. (``mdlora rollout`` once needed httpx,
    a dev extra.)"""
    import re
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    providers = packages_distributions()
    missing = []
    for path in sorted((REPO / "mdlora").rglob("*.py")):
        tree = ast.parse(path.read_text())
        optional = _optional(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in ("mdlora", *OPTIONAL):
                    continue
                if node.lineno in optional:
                    continue
                dists = {norm(d) for d in providers.get(top, [])}
                if not dists & declared:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {top} {sorted(dists)}")
    assert not missing, "imported but not a declared dependency:\n" + "\n".join(missing)
