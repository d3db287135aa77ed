"""The ONNX Runtime path: exported graphs score like the torch model, banks are inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mdlora.formats.onnx_export import (
    OnnxExportError,
    OnnxInputError,
    OnnxScorer,
    banks_from_model,
    default_providers,
    export_onnx,
)
from mdlora.models.features import DenseField, EncodedBatch, FeatureSpec, MultiHotField, SparseField
from mdlora.models.lora import AdapterBank
from mdlora.models.model import Division, ModelConfig, MultiDomainModel

SPEC = FeatureSpec(
    sparse=(SparseField("user", 30), SparseField("item", 20)),
    multi_hot=(MultiHotField("tags", 9, 3),),
    dense=(DenseField("price"), DenseField("age")),
)
DIVISIONS = (Division("nat", ("a", "b", "c")), Division("aux", ("x", "y")))
TOL = 1e-4


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def make_model(method: str, backbone: str, seed: int = 0, **overrides: object) -> MultiDomainModel:
    """A small model whose every weight (adapters' zero-initialised B and c too) is nonzero."""
    torch.manual_seed(seed)
    options = dict(
        features=SPEC, divisions=DIVISIONS, backbone=backbone, method=method, embed_dim=4,
        tower=(16, 8), ranks=(3, 2), experts_per_domain=2,
    )  # fmt: skip
    options.update(overrides)
    model = MultiDomainModel(ModelConfig(**options))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def make_batch(n: int, domain_counts: tuple[int, ...], seed: int = 1) -> EncodedBatch:
    """Random features over every domain, with OOV ids, padding and an empty multi-hot row."""
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, f.vocab_size, (n,), generator=g) for f in SPEC.sparse])
    sparse = sparse.T.contiguous()
    multi_hot = torch.randint(-1, 9, (n, 1, 3), generator=g)
    multi_hot[0] = -1
    domains = torch.stack(
        [torch.arange(n) % domain_counts[0], torch.randint(0, domain_counts[1], (n,), generator=g)],
        1,
    )
    return EncodedBatch(sparse, torch.rand(n, 2, generator=g), domains, multi_hot)


def adapter_banks(model: MultiDomainModel) -> list[AdapterBank]:
    assert model.tower.banks is not None
    return [b for b in model.tower.banks if isinstance(b, AdapterBank)]


def torch_probs(model: MultiDomainModel, batch: EncodedBatch) -> np.ndarray:
    with torch.no_grad():
        return model.score_batch(batch).numpy()


def onnx_probs(scorer: OnnxScorer, model: MultiDomainModel, batch: EncodedBatch) -> np.ndarray:
    return scorer.score(
        batch.sparse, batch.dense, batch.domains, batch.multi_hot, banks_from_model(model)
    )


Exported = Callable[[str, str], tuple[MultiDomainModel, Path]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """``exported(method, backbone)`` -> (model, onnx path), each exported once per module."""
    root = tmp_path_factory.mktemp("onnx")
    done: dict[tuple[str, str], tuple[MultiDomainModel, Path]] = {}

    def get(method: str, backbone: str) -> tuple[MultiDomainModel, Path]:
        if (method, backbone) not in done:
            model = make_model(method, backbone)
            path = export_onnx(model, root / f"{method}-{backbone}.onnx")
            done[method, backbone] = (model, path)
        return done[method, backbone]

    return get


CASES = [
    ("base", "deepfm"),
    ("base", "dcn"),
    ("mlora", "deepfm"),
    ("mlora", "dcn"),
    ("moe", "deepfm"),
    ("moe", "dcn"),
]


@pytest.mark.parametrize(("method", "backbone"), CASES)
def test_onnx_scores_match_torch_on_a_mixed_domain_batch(
    exported: Exported, method: str, backbone: str
) -> None:
    model, path = exported(method, backbone)
    scorer = OnnxScorer(path)
    batch = make_batch(64, (3, 2))
    expected = torch_probs(model, batch)
    got = onnx_probs(scorer, model, batch)
    assert got.shape == (64,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert "Loop" not in op_types(path)  # no per-sample loop in the graph
    if method != "base":
        assert scorer.bank_layers == 2
        # Routing matters: the same features scored as another domain give other scores.
        other = copy.copy(batch)
        other.domains = batch.domains.clone()
        other.domains[:, 0] = (batch.domains[:, 0] + 1) % 3
        assert np.abs(onnx_probs(scorer, model, other) - got).max() > 1e-3


@pytest.mark.parametrize(("method", "backbone"), [("mlora", "deepfm"), ("moe", "dcn")])
def test_a_domain_added_after_export_is_served_by_the_same_file(
    exported: Exported, method: str, backbone: str
) -> None:
    model, path = exported(method, backbone)
    scorer = OnnxScorer(path)
    grown = copy.deepcopy(model)
    before = make_batch(40, (3, 2))
    old_scores = onnx_probs(scorer, grown, before)
    new_id = grown.add_domain("nat", "d")  # MoE: gate_scope "all", the folded rank widens
    with torch.no_grad():
        rows = [new_id] if grown.gate is None else (grown.gate.owner == new_id).nonzero()[:, 0]
        for bank in adapter_banks(grown):
            bank.B[rows] = 0.5 * torch.randn_like(bank.B[rows])
            bank.bias[rows] = 0.5 * torch.randn_like(bank.bias[rows])
    banks = banks_from_model(grown)
    assert banks[0][0].shape[0] == 4
    batch = make_batch(48, (4, 2), seed=3)
    got = scorer.score(batch.sparse, batch.dense, batch.domains, batch.multi_hot, banks)
    np.testing.assert_allclose(got, torch_probs(grown, batch), atol=TOL, rtol=0)
    # The new domain has its own adapter: not the scores of domain 0 for the same rows.
    new_rows = batch.domains[:, 0] == new_id
    as_zero = copy.copy(batch)
    as_zero.domains = batch.domains.clone()
    as_zero.domains[:, 0] = 0
    assert np.abs(torch_probs(grown, as_zero)[new_rows] - got[new_rows]).max() > 1e-3
    # Existing domains score exactly as before the growth.
    np.testing.assert_allclose(onnx_probs(scorer, grown, before), old_scores, atol=1e-6, rtol=0)


def test_single_domain_rank_one_model_exports_with_dynamic_sizes(tmp_path: Path) -> None:
    """Sizes of 1 are specialised by torch.export; the export pads them in its example."""
    spec = FeatureSpec(sparse=SPEC.sparse, multi_hot=(MultiHotField("tags", 9, 1),))
    divisions = (Division("only", ("a",)), DIVISIONS[1])
    model = make_model("mlora", "deepfm", features=spec, divisions=divisions, ranks=(1, 1))
    scorer = OnnxScorer(export_onnx(model, tmp_path / "one.onnx"))
    model.add_domain("only", "b")
    with torch.no_grad():
        for bank in adapter_banks(model):
            bank.B[1] = torch.randn_like(bank.B[1])
    batch = make_batch(20, (2, 2))
    batch.multi_hot = torch.randint(-1, 9, (20, 1, 4))  # longer lists than max_len: L is dynamic
    batch.dense = batch.dense[:, :0]
    np.testing.assert_allclose(
        onnx_probs(scorer, model, batch), torch_probs(model, batch), atol=TOL, rtol=0
    )


def test_multilora_is_exported_with_its_weights_baked_in(tmp_path: Path) -> None:
    model = make_model("multilora", "deepfm")
    model.train()  # the export scores in eval mode and gives the mode back
    path = export_onnx(model, tmp_path / "multilora.onnx")
    scorer = OnnxScorer(path)
    assert model.training
    # The LoRA sets were traced with gathers (embedding_bag would export as a Loop).
    assert "Loop" not in op_types(path)
    model.eval()
    assert scorer.bank_layers == 0 and banks_from_model(model) == []
    assert "bank_0_a" not in scorer.input_names
    batch = make_batch(64, (3, 2))
    np.testing.assert_allclose(
        scorer.score(batch.sparse, batch.dense, batch.domains, batch.multi_hot),
        torch_probs(model, batch),
        atol=TOL,
        rtol=0,
    )
    assert scorer.metadata["mdlora.method"] == "multilora"
    assert scorer.metadata["mdlora.bank_inputs"] == "false"


def test_a_training_stage_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    model = make_model("moe", "deepfm")
    model.set_stage("expert", expert=1)
    with pytest.raises(OnnxExportError, match=r"stage 'expert'.*set_stage\('gate'\)"):
        export_onnx(model, tmp_path / "moe.onnx")
    assert list(tmp_path.iterdir()) == []


def test_scorer_refuses_inputs_that_do_not_fit_the_graph(exported: Exported) -> None:
    model, path = exported("mlora", "deepfm")
    scorer = OnnxScorer(path)
    batch = make_batch(8, (3, 2))
    banks = banks_from_model(model)
    args = (batch.sparse, batch.dense, batch.domains, batch.multi_hot)
    with pytest.raises(OnnxInputError, match="banks for 2 tower layer"):
        scorer.score(*args, banks[:1])
    with pytest.raises(OnnxInputError, match="multi_hot"):
        scorer.score(batch.sparse, batch.dense, batch.domains, None, banks)
    bad = batch.domains.clone()
    bad[0, 0] = 3
    with pytest.raises(OnnxInputError, match=r"in \[0, 3\)"):
        scorer.score(batch.sparse, batch.dense, bad, batch.multi_hot, banks)
    with pytest.raises(OnnxInputError, match="dense: axis 1 must be 2"):
        scorer.score(batch.sparse, batch.dense[:, :1], batch.domains, batch.multi_hot, banks)
    short = [(a[:2], b, c) for a, b, c in banks]
    with pytest.raises(OnnxInputError, match="bank 0: a, b, c must all have"):
        scorer.score(*args, short)


def test_providers_use_cuda_only_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "X"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = ("CUDAExecutionProvider", {"device_id": 0})
    assert default_providers() == [cuda, "CPUExecutionProvider"]


def test_providers_follow_the_serving_device(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A service told to score on the CPU or on a given GPU runs its ONNX sessions there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "X"])
    assert default_providers("cpu") == ["CPUExecutionProvider"]
    assert default_providers(torch.device("cuda:1"))[0] == ("CUDAExecutionProvider",
                                                            {"device_id": 1})  # fmt: skip
    assert default_providers("cuda")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level("WARNING", logger="mdlora.formats.onnx_export"):
        assert default_providers("cuda:1") == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text


@pytest.mark.parametrize(("method", "backbone"), [("mlora", "deepfm"), ("moe", "dcn")])
def test_a_model_on_any_device_exports_and_is_left_there(
    tmp_path: Path, method: str, backbone: str, device: torch.device
) -> None:
    """Exporting a model on the GPU writes the graph the CPU copy would, scored on the CPU."""
    model = make_model(method, backbone).to(device)
    path = export_onnx(model, tmp_path / "m.onnx")
    assert model.device.type == device.type and not model.training
    batch = make_batch(64, (3, 2))
    with torch.no_grad():
        expected = model.score_batch(batch.to(device)).cpu().numpy()
    got = onnx_probs(OnnxScorer(path, providers=["CPUExecutionProvider"]), model, batch)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
