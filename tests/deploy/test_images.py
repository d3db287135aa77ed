"""Static checks of the deploy stack: the Dockerfiles and .dockerignore.

Nothing here needs Docker or a cluster (helpers: ``tests/deploy/parsing.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.deploy.parsing import (
    DEPLOY,
    DOCKERFILES,
    REPO,
    _copy_sources,
    _dockerignore_patterns,
    _dockerignored,
    _exec_form,
    _expand_args,
    _option_value,
    _pyproject,
    _stage_args,
    _stages,
)

# ---------------------------------------------------------------------------
# Dockerfiles and .dockerignore
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_stage(dockerfile: Path) -> None:
    assert dockerfile.is_file(), f"{dockerfile} is missing"
    stages = _stages(dockerfile)
    assert len(stages) >= 2, f"{dockerfile.name} should be multi-stage"
    final = stages[-1]
    keywords = [k for k, _ in final]

    cmds = [args for k, args in final if k == "CMD"]
    assert len(cmds) == 1, f"{dockerfile.name}: final stage needs exactly one CMD"
    cmd = _exec_form(cmds[0])
    assert cmd is not None, "CMD must use the exec (JSON) form so signals reach uvicorn"
    assert cmd[:2] == ["mdlora", "serve"], f"CMD is {cmd}"
    port = _option_value(cmd, "--port")
    assert _option_value(cmd, "--host") == "0.0.0.0"

    exposed = {p.split("/")[0] for k, args in final if k == "EXPOSE" for p in args.split()}
    assert port in exposed, f"{dockerfile.name}: serves on {port}, exposes {exposed}"
    assert port == "8000"

    users = [args for k, args in final if k == "USER"]
    assert users, f"{dockerfile.name}: final stage runs as root (no USER)"
    user = _expand_args(users[-1], _stage_args(final)).split(":")[0]
    assert user not in {"root", "0"}, f"{dockerfile.name}: USER is {user}"
    assert user.isdigit(), "USER should be numeric so Kubernetes runAsNonRoot can verify it"
    assert int(user) == 10001, "k8s securityContext runAsUser expects uid 10001"

    checks = [args for k, args in final if k == "HEALTHCHECK"]
    assert checks and f":{port}/healthz" in checks[-1], "HEALTHCHECK must probe /healthz"
    assert keywords.index("USER") < keywords.index("CMD")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist_and_are_not_ignored(dockerfile: Path) -> None:
    patterns = _dockerignore_patterns()
    copied: list[str] = []
    for stage in _stages(dockerfile):
        for keyword, args in stage:
            if keyword not in {"COPY", "ADD"}:
                continue
            sources, from_stage = _copy_sources(args)
            if from_stage:
                continue
            assert sources, f"{dockerfile.name}: {keyword} {args} has no source"
            matched = 0
            for source in sources:
                assert not source.startswith(("/", "..")), f"{source} escapes the build context"
                if any(ch in source for ch in "*?["):
                    # BuildKit copies nothing for an unmatched glob; the COPY
                    # still needs one real source (checked below).
                    hits = [p for p in REPO.glob(source) if p.exists()]
                else:
                    assert (REPO / source).exists(), (
                        f"{dockerfile.name}: COPY source {source} missing"
                    )
                    hits = [REPO / source]
                for hit in hits:
                    rel = hit.relative_to(REPO).as_posix()
                    assert not _dockerignored(rel, patterns), (
                        f"{dockerfile.name}: COPY source {rel} is excluded by .dockerignore"
                    )
                    copied.append(rel)
                matched += len(hits)
            assert matched, f"{dockerfile.name}: {keyword} {args} matches no file"

    # Everything `pip install .` needs is in the image: the packages that
    # pyproject.toml includes and the readme it names (when there is one).
    includes = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in includes:
        package = pattern.rstrip("*").rstrip(".")
        if (REPO / package / "__init__.py").is_file():
            assert package in copied, f"{dockerfile.name} does not COPY package {package}/"
    readme = _pyproject()["project"].get("readme")
    if isinstance(readme, str) and (REPO / readme).is_file():
        assert readme in copied, f"{dockerfile.name} does not COPY {readme}"
    assert "pyproject.toml" in copied


def test_dockerignore_excludes_local_state() -> None:
    patterns = _dockerignore_patterns()
    for path in [
        ".venv",
        ".git",
        "data",
        "data/ml-1m/ratings.dat",
        "mdlora/__pycache__",
        "mdlora/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "mdlora.egg-info",
    ]:
        assert _dockerignored(path, patterns), f".dockerignore does not exclude {path}"
    for path in ["pyproject.toml", "mdlora/cli.py", "mdlora/training/data/__init__.py"]:
        assert not _dockerignored(path, patterns), f".dockerignore wrongly excludes {path}"


def test_pyproject_deps_helper() -> None:
    """deploy/docker/pyproject_deps.py: torch left out, CPU ONNX Runtime swapped in."""
    path = DEPLOY / "docker" / "pyproject_deps.py"
    spec = importlib.util.spec_from_file_location("pyproject_deps", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    declared = _pyproject()["project"]["dependencies"]
    names = [module.requirement_name(req) for req in declared]
    reqs = module.runtime_requirements(
        REPO / "pyproject.toml", ["torch"], {"onnxruntime-gpu": "onnxruntime"}
    )
    out_names = [module.requirement_name(req) for req in reqs]
    assert "torch" not in out_names
    assert "onnxruntime-gpu" not in out_names
    if "onnxruntime-gpu" in names:
        assert "onnxruntime" in out_names
    assert out_names.count("onnxruntime") == 1  # the Darwin line is not repeated
    # every declared name but torch, with the two ONNX Runtime lines merged into one
    assert sorted(set(out_names)) == sorted(
        {"onnxruntime" if n == "onnxruntime-gpu" else n for n in names} - {"torch"}
    )
    assert len(reqs) == len(out_names) == len(set(out_names))
    assert module.requirement_name("uvicorn[standard]>=0.27") == "uvicorn"
    assert module.requirement_name("Foo_Bar.baz ; python_version<'3.12'") == "foo-bar-baz"


