"""The artifact format: exact round trip, and tampered files refused with a clear message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mdlora.formats.adapter_package import (
    AdapterPackage,
    apply_adapter,
    make_adapter_package,
    read_adapter_package,
    write_adapter_package,
)
from mdlora.formats.artifact import (
    load_artifact,
    save_artifact,
)
from mdlora.formats.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ArtifactError,
    sha256_bytes,
)
from mdlora.models.model import MultiDomainModel
from tests.models.helpers import make_batch, make_config, perturb


def build(method: str, backbone: str = "deepfm") -> MultiDomainModel:
    model = perturb(MultiDomainModel(make_config(backbone, method)))
    model.train()
    batch = make_batch()
    model(batch.sparse, batch.dense, batch.domains, batch.multi_hot)  # touch norm statistics
    return model.eval()


@pytest.mark.parametrize("method", ["base", "mlora", "moe3", "multilora"])
def test_save_load_scores_identically(tmp_path: Path, method: str, device: torch.device) -> None:
    model = build(method, "dcn")
    cpu_batch = make_batch()
    with torch.no_grad():
        expected_cpu = model.score_batch(cpu_batch)
    model.to(device)
    batch = cpu_batch.to(device)
    with torch.no_grad():
        expected = model.score_batch(batch)
    encoder = {"kind": "test-encoder", "vocab": {"user": ["a", "b"]}}
    # saved from a model on ``device``, loaded onto the device asked for
    save_artifact(model, tmp_path / "art", encoder=encoder, metrics={"wauc": 0.7})
    art = load_artifact(tmp_path / "art", map_location=device)
    assert art.model.device.type == device.type
    with torch.no_grad():
        assert torch.equal(art.model.score_batch(batch), expected)
        on_cpu = load_artifact(tmp_path / "art").model  # the default: the CPU
        assert on_cpu.device.type == "cpu"
        assert torch.equal(on_cpu.score_batch(cpu_batch), expected_cpu)
    assert art.encoder == encoder
    assert art.manifest["metrics"] == {"wauc": 0.7}
    assert not list(tmp_path.glob(".art*")), "no temporary directories left behind"
    files = {p.name for p in (tmp_path / "art").rglob("*") if p.is_file()}
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".bin")) for f in files)


def test_saving_over_an_existing_artifact_replaces_it(tmp_path: Path) -> None:
    save_artifact(build("mlora"), tmp_path / "art")
    model = build("moe1")
    save_artifact(model, tmp_path / "art")
    assert load_artifact(tmp_path / "art").model.config.method == "moe"


def test_an_artifact_never_replaces_a_folder_it_would_lose_something_in(tmp_path: Path) -> None:
    """Not a folder of other files, not a file, not the adapters a service registered."""
    mine = tmp_path / "project"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("important")
    with pytest.raises(ArtifactError, match="holds no mdlora artifact"):
        save_artifact(build("mlora"), mine)
    assert (mine / "notes.txt").read_text() == "important" and (mine / "sub").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        save_artifact(build("mlora"), tmp_path / "file")
    served = tmp_path / "served"
    save_artifact(build("mlora"), served)
    (served / "registry.json").write_text("{}")  # what a service writes on registration
    with pytest.raises(ArtifactError, match="registered with a service"):
        save_artifact(build("moe1"), served)
    assert load_artifact(served).model.config.method == "mlora"
    (tmp_path / "empty").mkdir()
    save_artifact(build("mlora"), tmp_path / "empty")  # an empty folder is fine


def test_add_domain_refuses_to_write_the_grown_artifact_over_its_source(tmp_path: Path) -> None:
    from mdlora.training.add_domain import add_domain

    art = save_artifact(build("mlora"), tmp_path / "art")
    with pytest.raises(ArtifactError, match="is the artifact being read"):
        add_domain(art, tmp_path / "rows.parquet", "new", artifact_out=tmp_path / "." / "art")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ArtifactError, match="holds no mdlora artifact"):  # before any training
        add_domain(art, tmp_path / "rows.parquet", "new", artifact_out=tmp_path / "busy")


def _rewrite(
    path: Path, manifest_path: Path | None, change: Callable[[dict[str, torch.Tensor]], object]
) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    if manifest_path is not None:  # keep the checksum right so the shape check is what fires
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][path.name]["sha256"] = sha256_bytes(path.read_bytes())
        manifest_path.write_text(json.dumps(manifest))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path: Path) -> None:
    save_artifact(build("mlora"), tmp_path / "art")
    art = tmp_path / "art"
    _rewrite(art / "backbone.safetensors", art / "manifest.json",
             lambda t: t.__setitem__("head.weight", torch.zeros(1, 7)))  # fmt: skip
    with pytest.raises(ArtifactError, match=r"'head\.weight'.*\(1, 7\).*expected \(1, 16\)"):
        load_artifact(art)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_artifact(build("moe3"), tmp_path / "art")
    art = tmp_path / "art"
    _rewrite(art / "gate.safetensors", art / "manifest.json", lambda t: t.pop("gate.proj.bias"))
    with pytest.raises(ArtifactError, match=r"missing tensor\(s\) \['gate\.proj\.bias'\]"):
        load_artifact(art)


def test_changed_file_fails_its_checksum(tmp_path: Path) -> None:
    save_artifact(build("mlora"), tmp_path / "art")
    art = tmp_path / "art"
    _rewrite(art / "backbone.safetensors", None,
             lambda t: t.__setitem__("head.bias", t["head.bias"] + 1))  # fmt: skip
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(art)


def test_nan_in_adapter_is_refused(tmp_path: Path) -> None:
    save_artifact(build("mlora"), tmp_path / "art")
    pkg_dir = next((tmp_path / "art" / "adapters").glob("*/*/1"))
    tensors = load_file(pkg_dir / ADAPTER_WEIGHTS)
    tensors["tower.0.lora_B"][0, 0] = float("nan")
    save_file(tensors, pkg_dir / ADAPTER_WEIGHTS)
    config = json.loads((pkg_dir / ADAPTER_CONFIG).read_text())
    config["sha256"] = sha256_bytes((pkg_dir / ADAPTER_WEIGHTS).read_bytes())
    (pkg_dir / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"'tower\.0\.lora_B' has NaN"):
        read_adapter_package(pkg_dir)


def test_pickle_and_truncated_files_are_refused(tmp_path: Path) -> None:
    model = build("mlora")
    pkg = make_adapter_package(model, "occupation", "occ0")
    pkg_dir = write_adapter_package(pkg, tmp_path / "p")
    weights = (pkg_dir / ADAPTER_WEIGHTS).read_bytes()
    (pkg_dir / ADAPTER_WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ArtifactError, match="checksum"):
        read_adapter_package(pkg_dir)
    config = json.loads((pkg_dir / ADAPTER_CONFIG).read_text())
    del config["sha256"]
    (pkg_dir / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        read_adapter_package(pkg_dir)
    torch.save({"x": torch.zeros(2)}, pkg_dir / ADAPTER_WEIGHTS)  # a pickle, renamed
    with pytest.raises(ArtifactError, match="pickles are never loaded"):
        read_adapter_package(pkg_dir)
    # a header of 640 bytes starts the file with 80 02, pickle protocol 2's first bytes: a
    # truncated safetensors file is still called one, not a pickle
    from mdlora.formats.files import load_safetensors_bytes

    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    data = (640).to_bytes(8, "little") + header.ljust(640).encode() + b"\0" * 8
    assert data[:2] == b"\x80\x02" and load_safetensors_bytes(data, "w")["x"].shape == (2,)
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_safetensors_bytes(data[:300], "w")


def test_adapter_for_another_backbone_is_refused(tmp_path: Path) -> None:
    other = build("mlora", "wdl")
    pkg = make_adapter_package(other, "occupation", "occ0")
    with pytest.raises(ArtifactError, match="mlora/wdl model, this model is mlora/deepfm"):
        apply_adapter(build("mlora"), pkg)


def test_adapter_package_round_trip_adds_a_domain(tmp_path: Path) -> None:
    source = build("moe3")
    source.add_domain("occupation", "newcomer")
    with torch.no_grad():
        for p in source.tower.banks.parameters():  # type: ignore[union-attr]
            p[-3:].normal_()
    pkg_dir = write_adapter_package(
        make_adapter_package(source, "occupation", "newcomer", 2), tmp_path / "pkg"
    )
    target = build("moe3")
    target.load_state_dict(
        {k: v for k, v in source.state_dict().items() if not k.startswith(("tower.banks", "gate"))},
        strict=False,
    )
    with torch.no_grad():
        pairs = [
            *zip(target.tower.banks.parameters(), source.tower.banks.parameters(), strict=True),  # type: ignore[union-attr]
            *zip(target.gate.parameters(), source.gate.parameters(), strict=True),  # type: ignore[union-attr]
        ]
        for tp, sp in pairs:
            tp.copy_(sp[: tp.shape[0]])
    batch = make_batch(200, n_primary=7)
    new_id = apply_adapter(target, read_adapter_package(pkg_dir))
    assert new_id == 6
    with torch.no_grad():
        torch.testing.assert_close(target.score_batch(batch), source.score_batch(batch))


def test_an_artifact_scores_raw_records_like_the_core(tmp_path: Path, device: torch.device) -> None:
    import pandas as pd

    from mdlora.formats.encoder import FeatureEncoder
    from mdlora.models.features import EncodedBatch
    from tests.service.demo import build_demo_artifact
    from tests.service.helpers import core_scores

    art_dir = build_demo_artifact(tmp_path / "a", method="mlora", division="age")
    records: list[dict[str, object]] = [
        {"user_id": 5, "movie_id": 3, "age": 25, "gender": "F"},
        {"user_id": 7, "movie_id": 9, "age": 56},
        {"user_id": 999999, "movie_id": 12, "age": 18},
    ]
    art = load_artifact(art_dir, map_location=device)
    got = art.score(records)
    assert got.shape == (3,) and ((got > 0) & (got < 1)).all()
    assert np.allclose(got, core_scores(art_dir, records), atol=1e-5)
    # ... and like the training encoder's own transform of the same rows
    enc = FeatureEncoder.from_dict(art.encoder or {})
    arrays = enc.transform(pd.DataFrame(records))
    batch = EncodedBatch(*(torch.from_numpy(arrays[k]) for k in ("sparse", "dense", "domains")))
    with torch.inference_mode():
        assert np.allclose(got, art.model.score_batch(batch.to(device)).cpu().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="domain"):
        art.score([{"user_id": 5, "movie_id": 3, "age": 99}])
    # scoring again reuses the inference banks (folding them is the costly part)
    banks = art.model.inference_banks()
    assert np.array_equal(art.score(records), got)
    assert art.model.inference_banks() is banks
    art.model.train()  # ... which training drops, as it may change the weights
    art.model.eval()
    assert art.model.inference_banks() is not banks


def test_an_artifact_saved_without_alpha_or_ranks_loads_with_the_ranks_it_had(
    tmp_path: Path,
) -> None:
    """Before training resolved alpha per data setting, configs were saved with neither alpha
    nor ranks and the core filled in MovieLens's value; those artifacts still load alike."""
    model = perturb(MultiDomainModel(make_config("deepfm", "mlora", ranks=None, alpha=32.0)))
    model.eval()
    path = save_artifact(model, tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["model"]["alpha"] = None
    (path / "manifest.json").write_text(json.dumps(manifest))
    art = load_artifact(path)
    assert art.model.config.lora_ranks() == model.config.lora_ranks()
    batch = make_batch(16)
    assert torch.equal(art.model.score_batch(batch), model.score_batch(batch))


def test_a_method_with_adapters_needs_ranks_or_alpha() -> None:
    with pytest.raises(ValueError, match="needs adapter ranks: set ranks or alpha"):
        make_config("deepfm", "mlora", ranks=None)
    assert make_config("deepfm", "base", ranks=None).lora_ranks() == []


# ---------------------------------------------------------------- the domain list's one owner


@pytest.mark.parametrize("field", ["domains", "domain_order"])
def test_an_encoder_whose_domains_differ_from_the_manifest_is_refused_at_load(
    tmp_path: Path, field: str
) -> None:
    """The manifest's divisions own the domain list; an encoder.json that lists another one
    (another export's, or edited) is refused, naming both lists, instead of one being used."""
    from tests.service.demo import build_demo_artifact

    path = build_demo_artifact(tmp_path / "a", method="mlora", division="age")
    assert load_artifact(path).encoder is not None  # as written, the two agree
    # as an artifact written before the encoder's checksum was recorded (else that fires)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["encoder_sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    enc = json.loads((path / "encoder.json").read_text())
    enc[field]["age"] = ["1", "18", "25", "35", "45", "56", "50"]  # two ids swapped
    (path / "encoder.json").write_text(json.dumps(enc))
    want = (
        rf"artifact {path}: the encoder's {field} for division 'age' "
        r"\['1', '18', '25', '35', '45', '56', '50'\] differ from the manifest's "
        r"\['1', '18', '25', '35', '45', '50', '56'\]; .*re-export the artifact"
    )
    with pytest.raises(ArtifactError, match=want):
        load_artifact(path)
    del enc[field]["age"]
    (path / "encoder.json").write_text(json.dumps(enc))
    if field == "domains":  # a division the encoder does not list at all
        with pytest.raises(ArtifactError, match=r"'age' \(none\) differ from the manifest's"):
            load_artifact(path)
    else:  # no declared order is nothing to disagree with
        assert load_artifact(path).encoder is not None


def test_a_domain_added_to_the_model_reaches_the_saved_encoder_only_through_the_model(
    tmp_path: Path,
) -> None:
    """A model that gained a domain cannot be saved beside an encoder that did not: the
    encoder takes the model's lists (``set_domains``), and the saved pair agrees."""
    from dataclasses import replace

    from mdlora.formats.domains import model_domains
    from mdlora.formats.encoder import FeatureEncoder
    from tests.service.demo import build_demo_artifact, demo_adapter

    art = load_artifact(build_demo_artifact(tmp_path / "a", method="mlora", division="age"))
    assert art.encoder is not None
    apply_adapter(art.model, demo_adapter(art.model, "age", "99"))  # the service's path
    with pytest.raises(ArtifactError, match=r"cannot save .* for division 'age' .* model's"):
        save_artifact(art.model, tmp_path / "b", encoder=art.encoder)
    assert not (tmp_path / "b").exists()
    enc = FeatureEncoder.from_dict(art.encoder)
    enc.set_domains(model_domains(art.model.config))
    save_artifact(art.model, tmp_path / "b", encoder=enc.to_dict())
    grown = load_artifact(tmp_path / "b")
    assert grown.encoder is not None
    names = [str(a) for a in (1, 18, 25, 35, 45, 50, 56, 99)]
    assert grown.model.domain_names("age") == tuple(names)
    assert grown.encoder["domains"]["age"] == grown.encoder["domain_order"]["age"] == names
    records: list[dict[str, object]] = [{"user_id": 5, "movie_id": 3, "age": a} for a in (25, 99)]
    assert np.allclose(grown.score(records), replace(art, encoder=enc.to_dict()).score(records))


def test_artifact_apply_adapter_serves_a_new_domain_in_one_call(
    tmp_path: Path, device: torch.device
) -> None:
    """``Artifact.apply_adapter`` installs the package and teaches the encoder its domain, so
    ``score`` serves it; the result is what the manual four steps gave."""
    from dataclasses import replace

    from mdlora.formats.domains import model_domains
    from mdlora.formats.encoder import FeatureEncoder
    from tests.service.demo import build_demo_artifact, demo_adapter

    folder = build_demo_artifact(tmp_path / "a", method="mlora", division="age")
    art = load_artifact(folder, map_location=device)
    pkg = demo_adapter(load_artifact(folder).model, "age", "99")
    records: list[dict[str, object]] = [{"user_id": 5, "movie_id": 3, "age": a} for a in (25, 99)]
    with pytest.raises(ValueError, match="unknown domain"):
        art.score(records)
    before = art.score(records[:1])
    assert art.apply_adapter(pkg) == 7
    assert art.adapter_versions[("age", "99")] == 1
    assert art.encoder is not None and art.encoder["domains"]["age"][-1] == "99"
    scores = art.score(records)
    assert np.array_equal(scores[:1], before)  # an existing domain is untouched

    manual = load_artifact(folder, map_location=device)
    apply_adapter(manual.model, pkg)
    enc = FeatureEncoder.from_dict(manual.encoder or {})
    enc.set_domains(model_domains(manual.model.config))
    assert np.allclose(scores, replace(manual, encoder=enc.to_dict()).score(records), atol=1e-6)


def test_artifact_apply_adapter_refused_leaves_the_artifact_as_it_was(tmp_path: Path) -> None:
    from mdlora.formats.files import GROWN_VOCAB
    from mdlora.models.rows import rows_signature
    from tests.service.demo import build_demo_artifact, demo_adapter

    folder = build_demo_artifact(tmp_path / "a", method="mlora", division="age")
    art = load_artifact(folder)
    encoder = json.dumps(art.encoder, sort_keys=True)
    state = {k: v.clone() for k, v in art.model.state_dict().items()}
    pkg = demo_adapter(art.model, "age", "99")
    # grown ids the export already knows: refused before the model changes
    known = next(iter(art.encoder["vocabs"]["user_id"])) if art.encoder else "1"
    rows = {
        k: torch.zeros(shape, dtype=dt) for k, (shape, dt) in rows_signature(art.model, 1).items()
    }
    bad = AdapterPackage({**pkg.config, GROWN_VOCAB: {"user_id": [known]}},
                         {**pkg.tensors, **rows})  # fmt: skip
    with pytest.raises(ArtifactError, match="values the export already knows"):
        art.apply_adapter(bad)
    other = demo_adapter(art.model, "age", "98")
    other.config["model_signature"] = "0" * 16
    with pytest.raises(ArtifactError, match="different backbone"):
        art.apply_adapter(other)
    assert json.dumps(art.encoder, sort_keys=True) == encoder
    assert art.model.domain_names("age")[-1] != "99"
    after = art.model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_an_edited_or_broken_encoder_or_manifest_is_refused_with_what_is_wrong(
    tmp_path: Path,
) -> None:
    from tests.service.demo import build_demo_artifact

    path = build_demo_artifact(tmp_path / "a", method="mlora", division="age")
    good = (path / "encoder.json").read_bytes()
    enc = json.loads(good)
    enc["vocabs"]["user_id"][:2] = enc["vocabs"]["user_id"][1::-1]  # two ids swapped
    (path / "encoder.json").write_text(json.dumps(enc))
    with pytest.raises(ArtifactError, match=r"encoder.json: checksum does not match"):
        load_artifact(path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["encoder_sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "encoder.json").write_text("[]")
    with pytest.raises(ArtifactError, match="is not an encoder"):
        load_artifact(path)
    (path / "encoder.json").write_bytes(good)
    for key, want in (("files", "'files' .* is missing"), ("model", "'model' .* is missing")):
        broken = {k: v for k, v in manifest.items() if k != key}
        (path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ArtifactError, match=want):
            load_artifact(path)
    name = next(iter(manifest["files"]))
    broken = {**manifest, "files": {name: {"tensors": {}}}}
    (path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match=r"needs a 'sha256' string"):
        load_artifact(path)
