"""Static checks of the deploy stack: docker compose.

Nothing here needs Docker or a cluster (helpers: ``tests/deploy/parsing.py``)."""

from __future__ import annotations

import re
import shlex
from typing import Any
from urllib.parse import urlparse

from tests.deploy.parsing import (
    COMPOSE_FILE,
    DOCKERFILES,
    REPO,
    REQUIRED_ENV,
    REQUIRED_SERVICES,
    _argv,
    _compose,
    _container_ports,
    _env,
    _exec_form,
    _interpolate,
    _k8s_docs,
    _mdlora_invocations,
    _mdlora_subcommands,
    _mounts,
    _option_names,
    _option_value,
    _pyproject,
    _services,
    _stages,
    _walk,
)

# ---------------------------------------------------------------------------
# docker compose
# ---------------------------------------------------------------------------


def test_compose_has_required_services() -> None:
    missing = REQUIRED_SERVICES - set(_services())
    assert not missing, f"docker-compose.yml lacks services: {sorted(missing)}"


def test_compose_build_contexts_and_dockerfiles_exist() -> None:
    builds = 0
    for name, service in _services().items():
        build = service.get("build")
        if build is None:
            assert service.get("image"), f"service {name} has neither build nor image"
            continue
        builds += 1
        if isinstance(build, str):
            build = {"context": build}
        context = (COMPOSE_FILE.parent / _interpolate(str(build.get("context", ".")))).resolve()
        assert context.is_dir(), f"service {name}: build context {context} does not exist"
        dockerfile = context / _interpolate(str(build.get("dockerfile", "Dockerfile")))
        assert dockerfile.is_file(), f"service {name}: Dockerfile {dockerfile} does not exist"
        assert dockerfile.resolve() in {p.resolve() for p in DOCKERFILES}, (
            f"service {name} builds {dockerfile}, which these tests do not check"
        )
    assert builds, "no service builds the mdlora image"
    assert "build" in _services()["mdlora"], "service mdlora must build deploy/Dockerfile"


def test_compose_mounts_exist() -> None:
    declared = set(_compose().get("volumes") or {})
    for name, service in _services().items():
        for kind, source, target in _mounts(service):
            assert target.startswith("/"), f"service {name}: mount target {target!r} not absolute"
            if kind == "bind":
                assert source is not None and source.startswith("."), (
                    f"service {name}: bind mount {source!r} must be relative to the repository"
                )
                path = (COMPOSE_FILE.parent / source).resolve()
                assert path.exists(), f"service {name}: bind mount source {source} does not exist"
                assert REPO in path.parents, f"service {name}: {source} points outside the repo"
            elif kind == "volume" and source is not None:
                assert source in declared, (
                    f"service {name}: named volume {source!r} is not declared under volumes:"
                )


def test_pyproject_declares_the_mdlora_script() -> None:
    scripts = _pyproject()["project"].get("scripts", {})
    assert scripts.get("mdlora") == "mdlora.cli:app", (
        f"[project.scripts] mdlora should be 'mdlora.cli:app', got {scripts.get('mdlora')!r}"
    )


def test_compose_mdlora_service_runs_serve() -> None:
    service = _services()["mdlora"]
    argv = _argv(service.get("command"))
    assert argv[:2] == ["mdlora", "serve"], f"mdlora service command is {argv}"
    assert _option_value(argv, "--host") == "0.0.0.0", "serve must bind 0.0.0.0 in a container"
    port = _option_value(argv, "--port")
    assert port is not None and port.isdigit(), "serve needs an explicit --port"
    assert int(port) in _container_ports(service), (
        f"mdlora serves on {port} but publishes container ports {_container_ports(service)}"
    )


def test_compose_mdlora_environment_and_dependencies() -> None:
    services = _services()
    service = services["mdlora"]
    env = _env(service)
    missing = REQUIRED_ENV - set(env)
    assert not missing, f"mdlora service lacks environment variables {sorted(missing)}"
    assert env["MDLORA_REGISTRY"] == "redis"
    assert env["MDLORA_RUNTIME"] in {"torch", "onnx"}
    assert env["MDLORA_UNKNOWN_DOMAIN"] in {"refuse", "backbone"}
    assert env["MDLORA_ADMIN_TOKEN"], "MDLORA_ADMIN_TOKEN resolves to an empty token"

    redis_url = urlparse(env["MDLORA_REDIS_URL"])
    assert redis_url.scheme == "redis"
    assert redis_url.hostname in services, f"Redis host {redis_url.hostname} is not a service"
    assert (redis_url.port or 6379) == 6379

    depends = service.get("depends_on")
    assert isinstance(depends, dict), "mdlora depends_on must use the long form with conditions"
    assert depends.get(redis_url.hostname, {}).get("condition") == "service_healthy"
    redis_check = " ".join(_argv(services[redis_url.hostname]["healthcheck"]["test"]))
    assert "redis-cli" in redis_check and "ping" in redis_check


def test_compose_healthchecks_probe_the_serving_port() -> None:
    service = _services()["mdlora"]
    port = _option_value(_argv(service["command"]), "--port")
    check = service.get("healthcheck")
    assert check and not check.get("disable"), "mdlora service needs a healthcheck"
    text = " ".join(_argv(check["test"]))
    assert re.search(rf"(127\.0\.0\.1|localhost):{port}/healthz\b", text), (
        f"healthcheck does not probe /healthz on port {port}: {text}"
    )


def test_compose_artifact_init_service() -> None:
    """A one-shot service writes the artifact dir that mdlora reads, via a shared volume."""
    services = _services()
    mdlora = services["mdlora"]
    artifact_dir = _env(mdlora)["MDLORA_ARTIFACT_DIR"]
    init_services = {
        name: call
        for name, service in services.items()
        for call in _mdlora_invocations(_argv(service.get("command")))
        if call[:1] == ["quickstart"]
    }
    assert init_services, "no service runs `mdlora quickstart`"
    assert len(init_services) == 1
    ((init_name, call),) = init_services.items()
    assert _option_value(call, "--out") == artifact_dir, (
        f"{init_name} writes {_option_value(call, '--out')}, mdlora reads {artifact_dir}"
    )
    assert "--no-serve" in call, f"{init_name} must not start a server (--no-serve)"

    def volume_for(service: dict[str, Any]) -> str | None:
        for kind, source, target in _mounts(service):
            if (
                kind == "volume"
                and source
                and (artifact_dir == target or artifact_dir.startswith(target.rstrip("/") + "/"))
            ):
                return source
        return None

    shared = volume_for(mdlora)
    assert shared is not None, f"mdlora mounts no volume holding {artifact_dir}"
    assert volume_for(services[init_name]) == shared, f"{init_name} writes to another volume"
    condition = (mdlora.get("depends_on") or {}).get(init_name, {}).get("condition")
    assert condition == "service_completed_successfully"


def test_mdlora_subcommands_and_flags_exist_in_the_cli() -> None:
    """Every `mdlora SUB --flag` used by the deploy files exists in the typer app."""
    calls: list[tuple[str, list[str]]] = []
    for name, service in _services().items():
        for call in _mdlora_invocations(_argv(service.get("command"))):
            calls.append((f"docker-compose.yml:{name}", call))
    for dockerfile in DOCKERFILES:
        for keyword, args in _stages(dockerfile)[-1]:
            if keyword == "CMD":
                for call in _mdlora_invocations(_exec_form(args) or shlex.split(args)):
                    calls.append((dockerfile.name, call))
    for path, doc in _k8s_docs():
        for node in _walk(doc):
            if isinstance(node, dict) and "image" in node and "name" in node:
                argv = _argv(node.get("command")) + _argv(node.get("args"))
                for call in _mdlora_invocations(argv):
                    calls.append((f"{path.name}:{node['name']}", call))
    used = {call[0] for _, call in calls if call}
    assert {"serve", "quickstart"} <= used, f"deploy files call mdlora {sorted(used)}"

    commands = _mdlora_subcommands()
    for where, call in calls:
        assert call, f"{where}: bare `mdlora` call"
        sub, *rest = call
        assert sub in commands, f"{where}: `mdlora {sub}` is not a subcommand ({sorted(commands)})"
        options = _option_names(commands[sub])
        for arg in rest:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert flag in options, f"{where}: `mdlora {sub}` has no option {flag}"


