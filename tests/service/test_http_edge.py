"""HTTP lives at the service's edge: below ``mdlora/service/api/`` and ``app.py`` code raises
domain errors (:mod:`mdlora.service.errors`), and :mod:`mdlora.service.api.errors` alone
turns them into statuses and headers."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import mdlora.service
from mdlora.service import errors
from mdlora.service.api.errors import STATUS, error_response, headers_of, status_of
from mdlora.service.app import create_app  # imports every module that may define a kind
from mdlora.service.errors import (
    Conflict,
    NotFound,
    Refused,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from mdlora.service.settings import ServiceSettings
from tests.service.helpers import ADMIN_TOKEN

SERVICE = Path(mdlora.service.__file__).parent
EDGE = ("api", "app.py")  # may speak HTTP
WEB = ("fastapi", "starlette")


def below_edge() -> Iterator[Path]:
    for path in sorted(SERVICE.rglob("*.py")):
        if path.relative_to(SERVICE).parts[0] not in EDGE:
            yield path


def all_kinds(cls: type[ServiceError] = ServiceError) -> Iterator[type[ServiceError]]:
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("mdlora."):
            yield sub
            yield from all_kinds(sub)


def _called_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def test_the_guard_sees_the_service_modules() -> None:
    names = {p.name for p in below_edge()}
    assert {"control.py", "scoring.py", "rollout.py", "feedback.py", "errors.py"} <= names
    assert "app.py" not in names and not any(p.parent.name == "api" for p in below_edge())


@pytest.mark.parametrize("path", list(below_edge()), ids=lambda p: p.name)
def test_no_http_below_the_edge(path: Path) -> None:
    kinds = {"ServiceError"} | {k.__name__ for k in all_kinds()}
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            problems += [
                f"line {node.lineno}: imports {m}" for m in mods if (m or "").split(".")[0] in WEB
            ]
        if isinstance(node, ast.Call):
            name = _called_name(node)
            if name not in kinds and not (name or "").endswith("Error"):
                continue
            args = [*node.args, *(k.value for k in node.keywords)]
            problems += [
                f"line {node.lineno}: {name}(...) with the number {a.value}"
                for a in args
                if isinstance(a, ast.Constant) and type(a.value) is int and 100 <= a.value <= 599
            ]
    assert not problems, f"{path.relative_to(SERVICE)} speaks HTTP: {problems}"


def test_every_error_kind_has_a_status() -> None:
    kinds = list(all_kinds())
    assert {NotFound, Conflict, Refused, Unavailable} <= set(kinds)
    missing = [k.__name__ for k in kinds if k not in STATUS]
    assert not missing, f"no HTTP status for {missing} in mdlora.service.api.errors.STATUS"
    everything: list[type[ServiceError]] = [ServiceError, *kinds]
    for kind in everything:
        assert 400 <= status_of(kind) <= 599
    # the kinds are defined in one module, and named there
    assert {k.__module__ for k in kinds} == {errors.__name__}


def test_a_kind_below_a_listed_one_answers_as_its_base() -> None:
    class Gone(NotFound):
        pass

    assert status_of(Gone("x")) == 404
    assert status_of(ServiceError("x")) == 500


def test_headers_come_from_the_kind_and_retry_after() -> None:
    assert headers_of(Refused("no")) is None
    assert headers_of(Unauthenticated("who?")) == {"WWW-Authenticate": "Bearer"}
    assert headers_of(Unavailable("later", retry_after=2.1)) == {"Retry-After": "3"}
    response = error_response(Unavailable("later", retry_after=1, why="redis"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.body == b'{"detail":"later","why":"redis"}'


def test_an_error_located_in_a_batch_keeps_its_kind_and_fields() -> None:
    inner = NotFound("unknown domain 'x'", retry_after=4, known_domains={"age": ["1"]})
    located = inner.within("requests[3]", index=3)
    assert type(located) is NotFound and located.retry_after == 4
    assert located.body() == {
        "detail": "requests[3]: unknown domain 'x'",
        "index": 3,
        "known_domains": {"age": ["1"]},
    }
    assert list(located.body()) == ["detail", "index", "known_domains"]


def test_headers_of_an_error_reach_the_client_on_every_path(
    make_artifact: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ServiceSettings(artifact_dir=make_artifact("mlora"), admin_token=ADMIN_TOKEN)
    with TestClient(create_app(settings)) as c:
        service = c.app.state.service  # type: ignore[attr-defined]

        async def down(*args: object, **kw: object) -> None:
            raise Unavailable("the feature store is down", retry_after=5)

        monkeypatch.setattr(service.predictor, "predict", down)
        fast = c.post("/predict", json={"domain": "25", "user": {"id": 1}, "item_ids": [3]})
        assert fast.status_code == 503, fast.text
        assert fast.headers["retry-after"] == "5"
        assert fast.json() == {"detail": "the feature store is down"}

        # the routed API (the exception handler): 401 names its scheme, as before
        r = c.get("/v1/adapters")
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
