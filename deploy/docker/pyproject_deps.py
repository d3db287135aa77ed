"""Print the runtime dependencies of pyproject.toml as a pip requirements file.

Used by the Dockerfiles so third-party dependencies get their own cached layer
(rebuilt only when pyproject.toml changes, not on every source edit), and so
the image can pick the right build of the heavy packages:

* ``--exclude torch``: torch is installed beforehand from the PyTorch index of
  the chosen variant (CPU or a CUDA build) and must not be re-resolved from PyPI.
* ``--replace onnxruntime-gpu=onnxruntime``: the CPU image ships the CPU-only
  ONNX Runtime wheel (same ``onnxruntime`` import name, a fraction of the size).

Usage: python pyproject_deps.py pyproject.toml [--exclude NAME]... [--replace OLD=NEW]...
Standard library only (tomllib); on Python 3.10 it falls back to the copy of
tomli that pip vendors, so it runs inside any virtualenv made by ``python -m venv``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Ubuntu 22.04 based CUDA images ship Python 3.10
    from pip._vendor import tomli as tomllib

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return canonical(match.group(1))


def runtime_requirements(
    pyproject: Path,
    exclude: list[str] | None = None,
    replace: dict[str, str] | None = None,
) -> list[str]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    deps: list[str] = list(data.get("project", {}).get("dependencies", []))
    excluded = {canonical(name) for name in exclude or []}
    replacements = {canonical(old): new for old, new in (replace or {}).items()}
    out: list[str] = []
    emitted: set[str] = set()
    for req in deps:
        name = requirement_name(req)
        if name in excluded:
            continue
        if name in replacements:
            # Version bounds of the original are dropped on purpose: the two
            # builds are versioned independently.
            req = replacements[name]
            name = requirement_name(req)
        if name in emitted:  # e.g. the replacement is also listed for another platform
            continue
        emitted.add(name)
        out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME")
    parser.add_argument("--replace", action="append", default=[], metavar="OLD=NEW")
    args = parser.parse_args(argv)
    replace: dict[str, str] = {}
    for item in args.replace:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            parser.error(f"--replace expects OLD=NEW, got {item!r}")
        replace[old] = new
    for line in runtime_requirements(args.pyproject, args.exclude, replace):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
