"""The /v1 admin API: bearer token, register / list / show / roll back / remove, and a corpus
of bad adapter packages that must be refused without changing anything."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save

from mdlora.formats.adapter_package import (
    AdapterPackage,
    adapter_package_bytes,
)
from mdlora.formats.artifact import load_artifact
from mdlora.formats.files import sha256_bytes
from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.demo import demo_adapter, demo_model
from tests.service.helpers import ADMIN_TOKEN, AUTH, TOKEN, upload_files

PREDICT = {"domain": "25", "user": {"id": 5}, "item_ids": [3, 6, 9, 12]}


def client(artifact: Path, **kw: Any) -> TestClient:
    kw.setdefault("admin_token", ADMIN_TOKEN)
    return TestClient(create_app(ServiceSettings(artifact_dir=artifact, **kw)))


def predict(c: TestClient, domain: str) -> Any:
    return c.post("/predict", json={**PREDICT, "domain": domain})


ADMIN_CALLS = [
    ("get", "/v1/models"),
    ("get", "/v1/adapters"),
    ("get", "/v1/adapters/age/25"),
    ("post", "/v1/adapters/age/25/rollback"),
    ("delete", "/v1/adapters/age/25"),
    ("post", "/v1/adapters"),
]


@pytest.mark.parametrize(("verb", "path"), ADMIN_CALLS)
def test_admin_needs_the_right_bearer_token(
    make_artifact: Callable[[str], Path], verb: str, path: str
) -> None:
    with client(make_artifact("mlora")) as c:
        call = getattr(c, verb)
        none = call(path)
        wrong = call(path, headers={"Authorization": "Bearer not-the-token"})
        basic = call(path, headers={"Authorization": f"Basic {TOKEN}"})
        right = call(path, headers=AUTH)
    for r in (none, wrong, basic):
        assert r.status_code == 401, r.text
        assert "token" in r.json()["detail"]
    assert right.status_code not in (401, 403)


def test_admin_is_off_without_a_token_unless_dev_mode(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("mlora")
    with TestClient(create_app(ServiceSettings(artifact_dir=art))) as c:
        off = c.get("/v1/models", headers=AUTH)
    with TestClient(create_app(ServiceSettings(artifact_dir=art, dev_mode=True))) as c:
        dev = c.get("/v1/models")
    assert off.status_code == 403 and "MDLORA_ADMIN_TOKEN" in off.json()["detail"]
    assert dev.status_code == 200 and dev.json()["method"] == "mlora"


def test_register_roll_back_and_remove(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("mlora")
    model = load_artifact(art).model
    with client(art) as c:
        before = predict(c, "25").json()["scores"]
        assert predict(c, "99").status_code == 404
        r = c.post(
            "/v1/adapters",
            files=upload_files(demo_adapter(model, "age", "99", seed=3)),
            headers=AUTH,
        )
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["new_domain"] is True
        v1 = predict(c, "99").json()
        assert v1["adapter_versions"] == {"age": 1} and v1["registry_version"] == 1
        r = c.post(
            "/v1/adapters",
            files=upload_files(demo_adapter(model, "age", "99", seed=4)),
            headers=AUTH,
        )
        assert r.json()["version"] == 2 and r.json()["new_domain"] is False
        v2 = predict(c, "99").json()
        assert v2["scores"] != v1["scores"] and v2["adapter_versions"] == {"age": 2}
        # an artifact domain gets version 2 on top of its trained version 1
        r = c.post(
            "/v1/adapters",
            files=upload_files(demo_adapter(model, "age", "25", seed=5)),
            headers=AUTH,
        )
        assert r.json()["version"] == 2
        assert predict(c, "25").json()["scores"] != before
        shown = c.get("/v1/adapters/age/25", headers=AUTH).json()
        assert shown["active_version"] == 2 and shown["trained_with_artifact"] is True
        assert [v["version"] for v in shown["versions"]] == [1, 2]

        r = c.post("/v1/adapters/age/99/rollback", headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert predict(c, "99").json()["scores"] == v1["scores"]
        assert c.post("/v1/adapters/age/99/rollback", headers=AUTH).status_code == 409
        r = c.post("/v1/adapters/age/25/rollback", headers=AUTH)
        assert r.json() | {"registry_version": 0} == {
            "division": "age",
            "domain": "25",
            "action": "rollback",
            "version": 1,
            "origin": "artifact",
            "registry_version": 0,
            "sha256": None,
            "new_domain": None,
            "warnings": None,
        }
        assert predict(c, "25").json()["scores"] == before

        assert c.delete("/v1/adapters/age/25", headers=AUTH).status_code == 409  # trained with it
        assert c.delete("/v1/adapters/age/99", headers=AUTH).status_code == 200
        assert predict(c, "99").status_code == 404
        again = c.delete("/v1/adapters/age/99", headers=AUTH)
        assert again.status_code == 404 and "is not served (it was removed)" in again.text
        gone = c.get("/v1/adapters/age/99", headers=AUTH).json()  # the history stays
        assert gone["active_version"] is None and gone["versions"]
        assert c.get("/v1/adapters/age/nope", headers=AUTH).status_code == 404
        listing = c.get("/v1/adapters", headers=AUTH).json()
        r = c.post(
            "/v1/adapters",
            files=upload_files(demo_adapter(model, "age", "99", seed=6)),
            headers=AUTH,
        )
        assert r.json()["version"] == 3  # versions are never reused
    assert listing["registry"] == "ok"
    assert {a["domain"]: a["active_version"] for a in listing["adapters"]}["99"] is None
    # the local registry persists: a new process serves what was registered
    with client(art) as c:
        assert predict(c, "99").json()["adapter_versions"] == {"age": 3}


def _describe(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in sorted(tensors.items())
    }


def _forge(pkg: AdapterPackage, tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    """A self-consistent package (config lists the tensors, checksum matches) with ``tensors``."""
    weights = st_save(tensors)
    config = dict(pkg.config, tensors=_describe(tensors), sha256=sha256_bytes(weights))
    return json.dumps(config).encode(), weights


def _bad_header(weights: bytes, name: str, **spec: Any) -> bytes:
    """``weights`` with its safetensors header entry ``name`` changed (data unchanged)."""
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + n])
    header[name].update(spec)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + weights[8 + n :]


def _bad_packages(model: Any, tmp: Path) -> dict[str, tuple[bytes, bytes]]:
    good = demo_adapter(model, "age", "88")
    cfg, weights = adapter_package_bytes(good)
    unchecked = json.dumps({k: v for k, v in good.config.items() if k != "sha256"}).encode()
    t = good.tensors
    wrong_shape = dict(
        t,
        **{
            "tower.0.lora_A": torch.zeros(
                t["tower.0.lora_A"].shape[0] + 1, t["tower.0.lora_A"].shape[1]
            )
        },
    )
    missing = {k: v for k, v in t.items() if k != "tower.1.bias"}
    nan = dict(t, **{"tower.0.lora_B": torch.full_like(t["tower.0.lora_B"], float("nan"))})
    inf = dict(t, **{"tower.1.bias": torch.full_like(t["tower.1.bias"], float("inf"))})
    extra = dict(t, **{"tower.9.lora_A": torch.zeros(2, 2)})
    wrong_dtype = dict(t, **{"tower.0.lora_A": t["tower.0.lora_A"].to(torch.int32)})
    too_big = dict(t, **{"tower.0.lora_B": t["tower.0.lora_B"].double().fill_(1e300)})
    buf = io.BytesIO()
    torch.save(t, buf)  # a pickle archive renamed to .safetensors
    other, _ = demo_model("mlora", "age", backbone="dcn")
    other_tower, _ = demo_model("mlora", "age", tower=(32, 16))
    retrained = copy.deepcopy(model)  # same architecture and vocabularies, other weights
    with torch.no_grad():
        next(p for n, p in retrained.named_parameters() if "embedding" in n).add_(0.01)
    bad_name = copy.deepcopy(good)
    bad_name.config["domain"] = "../../etc"
    big_rank = json.loads(cfg)
    big_rank["ranks"] = [512, 512]

    def malformed(**fields: Any) -> tuple[bytes, bytes]:
        return json.dumps(dict(json.loads(cfg), **fields)).encode(), weights

    return {
        "wrong shape": _forge(good, wrong_shape),
        "missing tensor": _forge(good, missing),
        "NaN values": _forge(good, nan),
        "infinite values": _forge(good, inf),
        "unexpected tensor": _forge(good, extra),
        "wrong dtype": _forge(good, wrong_dtype),
        "float64 values beyond float32": _forge(good, too_big),
        "truncated file": (unchecked, weights[: len(weights) // 2]),
        "checksum mismatch": (cfg, weights[:-4] + b"\0\0\0\0"),
        "pickle renamed": (unchecked, buf.getvalue()),
        "empty file": (unchecked, b""),
        "config not json": (b"{nope", weights),
        "config nested 100,000 deep": (b"[" * 100_000, weights),
        "header shape not its bytes": (
            unchecked,
            _bad_header(weights, "tower.0.lora_A", shape=[*t["tower.0.lora_A"].shape, 2]),
        ),
        "config not an adapter": (json.dumps({"format": "something"}).encode(), weights),
        "other backbone": adapter_package_bytes(demo_adapter(other, "age", "88")),
        "other tower": adapter_package_bytes(demo_adapter(other_tower, "age", "88")),
        "other backbone weights": adapter_package_bytes(demo_adapter(retrained, "age", "88")),
        "path in domain name": adapter_package_bytes(bad_name),
        "ranks not the model's (over the cap)": (json.dumps(big_rank).encode(), weights),
        "unknown division": adapter_package_bytes(
            AdapterPackage(dict(good.config, division="gender"), good.tensors)
        ),
        "oversize": (cfg, weights + b"\0" * 70_000),
        "ranks empty": malformed(ranks=[]),
        "ranks null": malformed(ranks=None),
        "ranks a string": malformed(ranks="4,2"),
        "tensors null": malformed(tensors=None),
        "tensors a string": malformed(tensors="x"),
        "tensor spec without shape": malformed(tensors={"tower.0.lora_A": {"dtype": "float32"}}),
        "gate scope unknown": malformed(gate_scope="bogus"),
        "domain a number": malformed(domain=57),
        "version a string": malformed(version="2"),
        "future schema": malformed(schema_version=99),
        "ranks not the model's": malformed(ranks=[8]),
        "experts not the model's": malformed(experts=1_000_000_000),
        "method missing": (
            json.dumps({k: v for k, v in json.loads(cfg).items() if k != "method"}).encode(),
            weights,
        ),
        "backbone_sha256 a number": malformed(backbone_sha256=5),
        "domain name padded": malformed(domain="  88 "),
        "grown ids without rows listed": malformed(grown_vocab={"user_id": ["9999999"]}),
    }


def test_bad_packages_are_refused_and_change_nothing(
    make_artifact: Callable[[str], Path], tmp_path: Path
) -> None:
    art = make_artifact("mlora")
    model = load_artifact(art).model
    corpus = _bad_packages(model, tmp_path)
    with client(art, max_adapter_bytes=65_536) as c:
        good = upload_files(demo_adapter(model, "age", "77"))
        assert c.post("/v1/adapters", files=good, headers=AUTH).status_code == 201
        registry = (art / "registry.json").read_bytes()
        files = sorted(p.relative_to(art) for p in art.rglob("*"))
        listing = c.get("/v1/adapters", headers=AUTH).json()
        scores = {d: predict(c, d).json()["scores"] for d in ("25", "77")}
        for what, (cfg, weights) in corpus.items():
            r = c.post(
                "/v1/adapters",
                files={
                    "adapter_config": ("adapter_config.json", cfg),
                    "adapter_model": ("adapter_model.safetensors", weights),
                },
                headers=AUTH,
            )
            assert r.status_code in (413, 422), (what, r.status_code, r.text)
            assert isinstance(r.json()["detail"], str) and r.json()["detail"], what
        assert (art / "registry.json").read_bytes() == registry
        assert sorted(p.relative_to(art) for p in art.rglob("*")) == files
        assert c.get("/v1/adapters", headers=AUTH).json() == listing
        assert {d: predict(c, d).json()["scores"] for d in ("25", "77")} == scores
        assert predict(c, "88").status_code == 404
        metrics = c.get("/metrics").text
    assert f'mdlora_adapter_loads_total{{result="refused"}} {float(len(corpus))}' in metrics


def test_refusals_name_the_problem(make_artifact: Callable[[str], Path], tmp_path: Path) -> None:
    art = make_artifact("mlora")
    corpus = _bad_packages(load_artifact(art).model, tmp_path)
    expect = {
        "NaN values": "NaN",
        "missing tensor": "missing",
        "other backbone": "dcn",
        "oversize": "MDLORA_MAX_ADAPTER_BYTES",
        "wrong shape": "shape",
        "ranks not the model's (over the cap)": "ranks [512, 512], this model has",
        "pickle renamed": "pickle",
        "wrong dtype": "is int32, expected float32",
        "other backbone weights": "other backbone weights",
        "config nested 100,000 deep": "nested too deeply",
        "header shape not its bytes": "tensor 'tower.0.lora_A': shape [",
        "method missing": "lacks the 'method' field",
        "backbone_sha256 a number": "'backbone_sha256' must be a string, got 5",
        "domain name padded": "starts or ends with white space",
        "grown ids without rows listed": "has no 'embedding.rows'",
    }
    with client(art, max_adapter_bytes=65_536, max_adapter_rank=64) as c:
        for what, needle in expect.items():
            cfg, weights = corpus[what]
            files = {"adapter_config": ("c", cfg), "adapter_model": ("m", weights)}
            detail = c.post("/v1/adapters", files=files, headers=AUTH).json()["detail"]
            assert needle in detail, (what, detail)


def test_an_upload_far_over_the_limit_is_refused_before_it_is_read(
    make_artifact: Callable[[str], Path],
) -> None:
    with client(make_artifact("mlora"), max_adapter_bytes=4096) as c:
        huge = {"adapter_config": ("c", b"{}"), "adapter_model": ("m", b"\0" * (2 << 20))}
        r = c.post("/v1/adapters", files=huge, headers=AUTH)
    assert r.status_code == 413 and "MDLORA_MAX_ADAPTER_BYTES" in r.json()["detail"]


def test_missing_upload_fields_are_422(make_artifact: Callable[[str], Path]) -> None:
    with client(make_artifact("mlora")) as c:
        r = c.post("/v1/adapters", files={"adapter_config": ("c", b"{}")}, headers=AUTH)
        j = c.post("/v1/adapters", json={"x": 1}, headers=AUTH)
        text = c.post(
            "/v1/adapters",
            data={"adapter_config": "{}"},
            files={"adapter_model": ("m", b"x")},
            headers=AUTH,
        )
    assert r.status_code == 422 and "adapter_model" in r.json()["detail"]
    assert j.status_code == 422
    assert text.status_code == 422 and "send adapter_config as a file part" in text.json()["detail"]


def test_models_describes_the_serving_snapshot(make_artifact: Callable[[str], Path]) -> None:
    with client(make_artifact("moe")) as c:
        d = c.get("/v1/models", headers=AUTH).json()
    assert d["method"] == "moe" and d["backbone"] == "deepfm"
    assert d["divisions"] == [{"name": "gender", "adapted": True, "domains": ["F", "M"]}]
    assert {(a["domain"], a["version"], a["origin"]) for a in d["adapters"]} == {
        ("F", 1, "artifact"),
        ("M", 1, "artifact"),
    }
    assert d["runtime"] == "torch" and d["registry"] == "local" and d["registry_version"] == 0


def _renamed(pkg: AdapterPackage, **config: Any) -> AdapterPackage:
    """The same tensors (so the same weights file) under another config."""
    return AdapterPackage(dict(pkg.config, **config), pkg.tensors)


@pytest.mark.parametrize("registry", ["local", "redis"])
def test_packages_sharing_weights_stay_apart(
    make_artifact: Callable[[str], Path], registry: str, request: pytest.FixtureRequest
) -> None:
    """Two packages with byte-identical weights but different configs (another domain) are
    stored, cached and served as two packages, through a rollback and a restart."""
    art = make_artifact("mlora")
    kw: dict[str, Any] = {}
    if registry == "redis":
        kw = {
            "registry": "redis",
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_prefix": request.getfixturevalue("redis_prefix"),
        }
    model = load_artifact(art).model
    pkg = demo_adapter(model, "age", "new-a", seed=7)
    twin = _renamed(pkg, domain="new-b")
    other = demo_adapter(model, "age", "new-a", seed=8)
    assert adapter_package_bytes(pkg)[1] == adapter_package_bytes(twin)[1]
    with client(art, **kw) as c:
        for p in (pkg, twin, other):
            assert c.post("/v1/adapters", files=upload_files(p), headers=AUTH).status_code == 201
        want_b = predict(c, "new-b").json()["scores"]
        r = c.post("/v1/adapters/age/new-a/rollback", headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        want_a = predict(c, "new-a").json()["scores"]
        assert want_a == want_b  # same weights, and the same backbone around them
        assert c.get("/readyz").json()["status"] == "ready"
    with client(art, **kw) as c:  # a new process reads the store back
        assert c.get("/readyz").json()["status"] == "ready"
        assert predict(c, "new-a").json()["adapter_versions"] == {"age": 1}
        assert predict(c, "new-b").json()["scores"] == want_b
        shown = c.get("/v1/adapters/age/new-b", headers=AUTH).json()
        assert shown["active_version"] == 1 and shown["versions"][0]["package_sha256"]


def test_registering_the_active_package_again_changes_nothing(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("mlora")
    pkg = demo_adapter(load_artifact(art).model, "age", "again", seed=2)
    with client(art) as c:
        first = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
        again = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
        assert first.status_code == 201 and again.status_code == 200, again.text
        assert again.json()["action"] == "unchanged" and again.json()["version"] == 1
        assert again.json()["registry_version"] == first.json()["registry_version"]
        shown = c.get("/v1/adapters/age/again", headers=AUTH).json()
        assert [v["version"] for v in shown["versions"]] == [1]


def test_a_gate_scope_change_needs_a_removal_first(
    make_artifact: Callable[[str], Path],
) -> None:
    """MoE: one set of weights registered with gate_scope "own", then "all". The scope is fixed
    when a domain is added, so v2 is refused (it was once served with v1's gate row, because
    the package cache was keyed on the weights); after a removal it serves as a fresh server
    holding only that package does."""
    art = make_artifact("moe")
    model = load_artifact(art).model
    own = demo_adapter(model, "gender", "X", seed=2)
    assert own.config.get("gate_scope") == "own"
    both = _renamed(own, gate_scope="all")
    req = {**PREDICT, "domain": "X"}
    with client(make_artifact("moe")) as fresh:
        assert fresh.post("/v1/adapters", files=upload_files(both), headers=AUTH).status_code == 201
        want = fresh.post("/predict", json=req).json()["scores"]
    with client(art) as c:
        assert c.post("/v1/adapters", files=upload_files(own), headers=AUTH).status_code == 201
        v1 = c.post("/predict", json=req).json()["scores"]
        r = c.post("/v1/adapters", files=upload_files(both), headers=AUTH)
        assert r.status_code == 422 and "scope" in r.json()["detail"], r.text
        assert c.post("/predict", json=req).json()["scores"] == v1
        assert c.delete("/v1/adapters/gender/X", headers=AUTH).status_code == 200
        assert c.post("/v1/adapters", files=upload_files(both), headers=AUTH).status_code == 201
        v3 = c.post("/predict", json=req).json()
    assert v3["adapter_versions"] == {"gender": 2}  # the refused one took no version
    assert v3["scores"] == pytest.approx(want, abs=1e-6) and v3["scores"] != v1


def test_readiness_is_degraded_while_a_registered_adapter_cannot_load(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("mlora")
    model = load_artifact(art).model
    with client(art) as c:
        pkg = demo_adapter(model, "age", "late", seed=3)
        assert c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH).status_code == 201
        assert c.get("/readyz").json()["status"] == "ready"
    stored = art / "adapters" / "age" / "late" / "1" / "adapter_model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-8] + b"\0" * 8)  # damaged on disk
    with client(art) as c:
        ready = c.get("/readyz").json()
        assert predict(c, "late").status_code == 404
        assert ready["status"] == "degraded" and ready["registry"] == "ok"
        assert "age/late v1" in ready["adapters"] and "checksum" in ready["adapters"]
        # a good registration of the same domain brings it back
        pkg = demo_adapter(model, "age", "late", seed=4)
        assert c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH).status_code == 201
        assert c.get("/readyz").json()["status"] == "ready"
        assert predict(c, "late").status_code == 200


@pytest.mark.parametrize("config_says", ["its dtype", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_packages_saved_in_another_float_type_are_cast(
    make_artifact: Callable[[str], Path], dtype: torch.dtype, config_says: str
) -> None:
    """Cast whichever float type the config declares (a float16 file whose config still says
    float32, as a converted package may, was refused)."""
    art = make_artifact("mlora")
    model = load_artifact(art).model
    pkg = demo_adapter(model, "age", "half", seed=3)
    low = AdapterPackage(pkg.config, {k: v.to(dtype) for k, v in pkg.tensors.items()})
    cfg, weights = _forge(low, low.tensors)
    if config_says == "float32":
        cfg = json.dumps(dict(json.loads(cfg), tensors=_describe(pkg.tensors))).encode()
    with client(art) as c:
        files = {"adapter_config": ("c", cfg), "adapter_model": ("m", weights)}
        r = c.post("/v1/adapters", files=files, headers=AUTH)
        assert r.status_code == 201, r.text
        got = predict(c, "half").json()["scores"]
    with client(make_artifact("mlora")) as c:
        assert c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH).status_code == 201
        want = predict(c, "half").json()["scores"]
    assert got == pytest.approx(want, abs=0.02)


def test_a_package_without_its_backbone_checksum_is_taken_with_a_warning(
    make_artifact: Callable[[str], Path],
) -> None:
    art = make_artifact("mlora")
    pkg = demo_adapter(load_artifact(art).model, "age", "old-writer", seed=2)
    del pkg.config["backbone_sha256"]
    with client(art) as c:
        r = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
        assert r.status_code == 201, r.text
        assert "backbone_sha256" in " ".join(r.json()["warnings"])
        pkg = demo_adapter(load_artifact(art).model, "age", "new-writer", seed=2)
        r = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
        assert r.json()["warnings"] == []


def test_the_rank_cap_reads_the_tensors(make_artifact: Callable[[str], Path]) -> None:
    art = make_artifact("mlora")
    pkg = demo_adapter(load_artifact(art).model, "age", "wide", seed=2)  # ranks [2, 1]
    del pkg.config["ranks"]  # only the tensors can tell
    with client(art, max_adapter_rank=1) as c:
        r = c.post("/v1/adapters", files=upload_files(pkg), headers=AUTH)
    assert r.status_code == 422 and "rank 2 exceeds the cap 1" in r.json()["detail"], r.text


def test_a_stored_package_with_another_gate_scope_still_loads(
    make_artifact: Callable[[str], Path],
) -> None:
    """Registries written before the scope check could hold a package for an artifact domain
    that says gate_scope "own" (the demo helper wrote that): it loads as before, with its
    tensors, and only a new registration of such a package is refused."""
    from mdlora.service.registry import LocalRegistry, RegistryState, new_record, set_active

    art = make_artifact("moe")
    pkg = demo_adapter(load_artifact(art).model, "gender", "F", seed=5)
    pkg.config["gate_scope"] = "own"
    config, weights = adapter_package_bytes(pkg)
    record = new_record(2, config, weights)
    state = RegistryState().with_entry(("gender", "F"), set_active(None, 2, record))
    LocalRegistry(art).commit(0, state, (("gender", "F"), record, config, weights))
    with client(art) as c:
        assert c.get("/readyz").json()["status"] == "ready"
        r = c.post("/predict", json={**PREDICT, "domain": "F"})
        assert r.json()["adapter_versions"] == {"gender": 2}
        again = c.post("/v1/adapters", files=upload_files(_renamed(pkg, version=3)), headers=AUTH)
        assert again.status_code == 422 and "scope" in again.json()["detail"]


def test_a_moe_version_whose_experts_other_gates_mix_says_their_scores_change(
    make_artifact: Callable[[str], Path],
) -> None:
    """MoE-MLoRA: the artifact's domains gate over every expert, so a new version of one
    domain's experts moves the others' scores; the answer names them (a new 'own'-scope
    domain moves nobody and says nothing)."""
    art = make_artifact("moe")
    model = load_artifact(art).model
    with client(art) as c:
        before = c.post("/predict", json={**PREDICT, "domain": "M"}).json()["scores"]
        r = c.post("/v1/adapters", files=upload_files(demo_adapter(model, "gender", "F", seed=3)),
                   headers=AUTH)  # fmt: skip
        assert r.status_code == 201, r.text
        assert any("changes their scores too" in w and "'M'" in w for w in r.json()["warnings"])
        assert c.post("/predict", json={**PREDICT, "domain": "M"}).json()["scores"] != before
        new = c.post("/v1/adapters", files=upload_files(demo_adapter(model, "gender", "X")),
                     headers=AUTH)  # fmt: skip
        assert new.status_code == 201 and new.json()["warnings"] == [], new.text
