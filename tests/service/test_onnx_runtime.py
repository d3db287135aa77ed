"""The ONNX Runtime path (MDLORA_RUNTIME=onnx) scores like the torch path, before and after
a registration (which feeds grown banks to the same graph: no re-export)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mdlora.formats.artifact import load_artifact
from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_adapter
from tests.service.helpers import ADMIN_TOKEN, AUTH, upload_files, wait_until

pytest.importorskip("onnxruntime")

CASES = {
    "mlora": ("age", "25", {}),
    "moe": ("gender", "F", {}),
    "multilora": ("age_group", "25", {"domains": {"gender": "F"}}),
}


def request(domain: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "domain": domain,
        "user": {"id": 3, "features": {"gender": "F", "age": 25, "occupation": 4}},
        "items": [
            {"id": i, "features": {"genres": ["Drama", "War"], "first_genre": "Drama"}}
            for i in (3, 6, 9, 12, 15, 424242)
        ],
        **extra,
    }


@pytest.mark.parametrize("method", ["mlora", "moe", "multilora"])
def test_onnx_scores_match_torch(make_artifact: Callable[[str], Path], method: str) -> None:
    division, known, extra = CASES[method]
    art = make_artifact(method)
    model = load_artifact(art).model
    common: dict[str, Any] = {
        "admin_token": ADMIN_TOKEN,
        "unknown_domain": "backbone",
        "reconcile_interval_s": 0.2,
    }
    onnx_app = create_app(ServiceSettings(artifact_dir=art, runtime="onnx", **common))
    torch_app = create_app(ServiceSettings(artifact_dir=art, runtime="torch", **common))
    with TestClient(onnx_app) as o, TestClient(torch_app) as t:
        for domain in (known, "not-a-domain"):
            a = o.post("/predict", json=request(domain, extra)).json()
            b = t.post("/predict", json=request(domain, extra)).json()
            np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
            assert a["backbone_only"] == b["backbone_only"] == (domain != known)
        if method == "multilora":
            return  # its adapters are baked into the graph: a registration re-exports (slow)
        pkg = upload_files(demo_adapter(model, division, "new", seed=7))
        assert o.post("/v1/adapters", files=pkg, headers=AUTH).status_code == 201
        # the torch app shares the artifact directory (local registry) and reconciles
        new = request("new", extra)
        wait_until(lambda: not t.post("/predict", json=new).json()["backbone_only"], 5.0)
        a = o.post("/predict", json=new).json()
        b = t.post("/predict", json=new).json()
        assert a["adapter_versions"] == b["adapter_versions"] == {division: 1}
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
        d = o.get("/v1/models", headers=AUTH).json()
        assert d["runtime"] == "onnx"


def test_the_artifacts_own_onnx_file_is_used(make_artifact: Callable[[str], Path]) -> None:
    from mdlora.formats.onnx_export import export_onnx

    art = make_artifact("mlora")
    export_onnx(load_artifact(art).model, art / "model.onnx")  # what `mdlora export` ships
    settings = ServiceSettings(artifact_dir=art, runtime="onnx")
    with TestClient(create_app(settings)) as o:
        r = o.post("/predict", json=request("25", {}))
        runner = o.app.state.service.control.current.runner  # type: ignore[attr-defined]
    assert r.status_code == 200
    assert runner.session.path == art / "model.onnx"


def test_exports_leave_no_files_behind(make_artifact: Callable[[str], Path]) -> None:
    """MultiLoRA re-exports its graph on every change: the files go as soon as the session
    holds the graph, and the export folder goes with the app."""
    art = make_artifact("multilora")
    model = load_artifact(art).model
    app = create_app(ServiceSettings(artifact_dir=art, runtime="onnx", admin_token=ADMIN_TOKEN))
    with TestClient(app) as c:
        workdir = app.state.service.onnx.workdir
        pkg = upload_files(demo_adapter(model, "age_group", "new", seed=7))
        assert c.post("/v1/adapters", files=pkg, headers=AUTH).status_code == 201
        r = c.post("/predict", json=request("new", {"domains": {"gender": "F"}}))
        assert r.status_code == 200 and r.json()["adapter_versions"]["age_group"] == 1
        assert workdir.is_dir() and not any(workdir.iterdir())
    assert not workdir.exists()
