"""The core's contract: one call for a mixed batch, zero-init identity, growth, routing."""

from __future__ import annotations

import pytest
import torch

from mdlora.models.backbones import BACKBONES
from mdlora.models.features import EncodedBatch
from mdlora.models.kernels import kernel_available
from mdlora.models.lora import ROUTING_STRATEGIES
from mdlora.models.model import MultiDomainModel
from tests.models.helpers import METHODS, N_PRIMARY, make_batch, make_config, perturb


def score(model: MultiDomainModel, batch: EncodedBatch) -> torch.Tensor:
    with torch.no_grad():
        return model.score_batch(batch)


def per_domain_scores(model: MultiDomainModel, batch: EncodedBatch) -> torch.Tensor:
    """Score each (primary, auxiliary) domain cell's samples with a separate model call."""
    out = torch.full((len(batch),), float("nan"), device=batch.domains.device)
    cells = batch.domains[:, 0] * 10 + batch.domains[:, 1]
    for cell in cells.unique():
        idx = (cells == cell).nonzero().squeeze(1)
        out[idx] = score(model, batch.select(idx))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_mixed_batch_equals_per_domain_calls(
    backbone: str, method: str, device: torch.device
) -> None:
    model = perturb(MultiDomainModel(make_config(backbone, method))).eval().to(device)
    batch = make_batch().to(device)
    mixed = score(model, batch)
    separate = per_domain_scores(model, batch)
    assert not torch.isnan(separate).any()
    torch.testing.assert_close(mixed, separate, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["mlora", "moe1", "moe3"])
@pytest.mark.parametrize("backbone", ["deepfm", "dcn", "autoint"])
def test_zero_initialised_adapters_leave_backbone_unchanged(
    backbone: str, method: str, device: torch.device
) -> None:
    model = MultiDomainModel(make_config(backbone, method)).eval().to(device)
    with torch.no_grad():  # a trained backbone, fresh adapters
        for name, p in model.named_parameters():
            if not name.startswith(("tower.banks", "gate")):
                p.add_(torch.randn_like(p) * 0.1)
    batch = make_batch().to(device)
    adapted = score(model, batch)
    model.set_stage("backbone")
    torch.testing.assert_close(adapted, score(model, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", ["deepfm", "mlp"])
def test_moe_training_mixture_equals_folded_inference(backbone: str, device: torch.device) -> None:
    """The soft gate used in training and the per-domain folded adapters agree."""
    model = perturb(MultiDomainModel(make_config(backbone, "moe3"))).train().to(device)
    batch = make_batch().to(device)
    soft = score(model, batch)
    model.eval()
    torch.testing.assert_close(soft, score(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["mlora", "moe1", "moe3"])
def test_routing_strategies_agree(method: str, device: torch.device) -> None:
    model = perturb(MultiDomainModel(make_config("deepfm", method))).eval().to(device)
    batch = make_batch().to(device)
    model.set_routing("gather")  # the reference: each sample's own A[d], B[d], c[d]
    ref = score(model, batch)
    for strategy in ROUTING_STRATEGIES:
        model.set_routing(strategy)
        torch.testing.assert_close(score(model, batch), ref, atol=1e-5, rtol=0)
        # an empty batch, one sample, and one domain only: the edge cases of every layout
        for part in (batch.select(torch.arange(0, device=device)),
                     batch.select(torch.arange(1, device=device)),
                     _single_domain(batch, 3)):  # fmt: skip
            model.set_routing("gather")
            expected = score(model, part)
            model.set_routing(strategy)
            torch.testing.assert_close(score(model, part), expected, atol=1e-5, rtol=0)
    chosen = model.tune_routing(batch, repeats=2)
    assert set(chosen) <= set(ROUTING_STRATEGIES)
    assert len(chosen) == 2
    torch.testing.assert_close(score(model, batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("method", "division", "scope"),
    [
        ("mlora", "occupation", "all"),
        ("moe1", "occupation", "all"),
        ("moe3", "occupation", "own"),
        ("moe3", "occupation", "all"),
        ("multilora", "occupation", "all"),
        ("multilora", "gender", "all"),
        ("base", "occupation", "all"),
    ],
)
def test_adding_a_domain_leaves_existing_domains_bit_identical(
    method: str, division: str, scope: str, device: torch.device
) -> None:
    model = perturb(MultiDomainModel(make_config("deepfm", method))).eval().to(device)
    default_routing = model.routing
    model.set_routing("kernel")  # per-sample routing: a sample reads only its own rows
    batch = make_batch().to(device)
    before = score(model, batch)
    model.set_routing(default_routing)
    before_default = score(model, batch)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    new_id = model.add_domain(division, "newcomer", gate_scope=scope)
    assert model.domain_names(division)[new_id] == "newcomer"
    # the default (merged GEMM segments, or a GEMM mixture if chosen) is checked to rounding
    torch.testing.assert_close(score(model, batch), before_default, atol=1e-6, rtol=0)
    model.set_routing("kernel")
    assert torch.equal(score(model, batch), before)
    # the new domain scores, and its weights can train
    col = 0 if division == "occupation" else 1
    fresh = make_batch(50).to(device)
    fresh.domains[:, col] = new_id
    assert torch.isfinite(score(model, fresh)).all()
    grown = {k for k, v in model.state_dict().items() if k in shapes and v.shape != shapes[k]}
    if method != "base":
        assert grown, "adding a domain should grow some adapter tensor"


def test_mlora_new_domain_starts_as_backbone() -> None:
    model = perturb(MultiDomainModel(make_config("wdl", "mlora"))).eval()
    new_id = model.add_domain("occupation", "newcomer")
    batch = make_batch(80)
    batch.domains[:, 0] = new_id
    adapted = score(model, batch)
    model.set_stage("backbone")
    torch.testing.assert_close(adapted, score(model, batch), atol=1e-6, rtol=0)


def test_add_existing_domain_is_refused() -> None:
    model = MultiDomainModel(make_config("deepfm", "mlora"))
    with pytest.raises(ValueError, match="already exists"):
        model.add_domain("occupation", "occ1")
    with pytest.raises(KeyError, match="unknown division"):
        model.add_domain("nope", "x")


def test_bad_config_and_stage_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        MultiDomainModel(make_config("resnet", "base"))
    with pytest.raises(ValueError, match="method must be one of"):
        make_config("deepfm", "lora")
    model = MultiDomainModel(make_config("deepfm", "moe1"))
    with pytest.raises(ValueError, match="has stages"):
        model.set_stage("fusion")
    with pytest.raises(ValueError, match="needs expert"):
        model.set_stage("expert", expert=N_PRIMARY)


def test_unknown_routing_strategy_is_refused() -> None:
    model = MultiDomainModel(make_config("deepfm", "mlora"))
    with pytest.raises(ValueError, match="unknown routing strategy"):
        model.set_routing("magic")


def test_multi_hot_padding_is_ignored_and_oov_is_a_real_row() -> None:
    model = perturb(MultiDomainModel(make_config("mlp", "base"))).eval()
    batch = make_batch(4)
    scores = []
    for ids in ([3, -1, -1], [-1, 3, -1], [3, 3, -1]):  # the last: mean of the same id twice
        batch.multi_hot = torch.tensor([[ids]]).expand(4, 1, 3).clone()
        scores.append(score(model, batch))
    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(scores[2], scores[0])
    batch.multi_hot = torch.tensor([[[0, -1, -1]]]).expand(4, 1, 3).clone()  # OOV is not padding
    assert not torch.allclose(score(model, batch), scores[0])


def test_fused_kernel_is_available_and_used() -> None:
    """numba is a dependency, so the default CPU routing really runs the fused kernel."""
    assert kernel_available()
    model = perturb(MultiDomainModel(make_config("deepfm", "mlora"))).eval()
    batch = make_batch()
    with torch.inference_mode():
        fused = model.score_batch(batch)
    model.set_routing("bag")
    with torch.inference_mode():
        torch.testing.assert_close(model.score_batch(batch), fused, atol=1e-5, rtol=0)


def _single_domain(batch: EncodedBatch, domain: int) -> EncodedBatch:
    one = batch.select(torch.arange(len(batch)))
    one.domains = one.domains.clone()
    one.domains[:, 0] = domain
    return one


@pytest.mark.parametrize("method", ["mlora", "moe1", "moe3"])
def test_single_domain_batches_use_the_merged_layers(method: str) -> None:
    """A one-domain batch (a /predict request) runs W + A_d B_d as one GEMM per layer, and
    scores as the per-sample adapters do."""
    from mdlora.models.lora import Segments

    model = perturb(MultiDomainModel(make_config("deepfm", method))).eval()
    batch = _single_domain(make_batch(), 2)
    banks = model.inference_banks()
    assert all(b.merge_limit >= 1 and b.merged_w is not None for b in banks)
    assert banks[0].merged_forward(torch.randn(5, banks[0].a.shape[1]),
                                   Segments(torch.full((5,), 2))) is not None  # fmt: skip
    merged = score(model, batch)
    model.set_routing("bag")  # no kernel, and the merged path off for comparison:
    for b in model.inference_banks():
        b.merge_limit = 0
    torch.testing.assert_close(merged, score(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["mlora", "moe3"])
def test_merged_strategy_segments_match_and_fall_back(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = perturb(MultiDomainModel(make_config("deepfm", method))).eval()
    batch = make_batch()
    model.set_routing("kernel")
    ref = score(model, batch)
    model.set_routing("merged")
    for b in model.inference_banks():
        b.merge_limit = N_PRIMARY  # every domain of the batch as its own GEMM segment
    torch.testing.assert_close(score(model, batch), ref, atol=1e-5, rtol=0)
    # over the memory cap nothing is merged, and scores are the same
    monkeypatch.setattr("mdlora.models.lora.MERGED_MAX_BYTES", 16)
    model.set_routing("merged")
    assert all(b.merge_limit == 0 and b.merged_w is None for b in model.inference_banks())
    torch.testing.assert_close(score(model, batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["mlora", "moe3"])
def test_adding_a_domain_leaves_single_domain_scores_bit_identical(method: str) -> None:
    model = perturb(MultiDomainModel(make_config("deepfm", method))).eval()
    batches = [_single_domain(make_batch(64), d) for d in range(N_PRIMARY)]
    before = [score(model, b) for b in batches]
    model.add_domain("occupation", "newcomer")
    for b, old in zip(batches, before, strict=True):
        assert torch.equal(score(model, b), old)


def test_merged_layers_follow_a_change_of_the_shared_weights() -> None:
    """The merged per-domain layers contain the tower's weights: editing those (fine-tuning,
    loading another checkpoint) must not leave a stale inference cache behind."""
    model = perturb(MultiDomainModel(make_config("deepfm", "mlora"))).eval()
    batch = _single_domain(make_batch(), 1)
    before = score(model, batch)
    first = model.tower.linears[0]
    assert isinstance(first, torch.nn.Linear)
    with torch.no_grad():
        first.weight.mul_(1.5)
    after = score(model, batch)
    assert not torch.allclose(after, before)
    for b in model.inference_banks():
        b.merge_limit = 0  # the per-sample path, which reads the live weights
    torch.testing.assert_close(score(model, batch), after, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["mlora", "moe3"])
def test_out_of_range_domain_ids_are_refused(method: str) -> None:
    model = MultiDomainModel(make_config("deepfm", method)).eval()
    n = len(model.config.divisions[0].domains)
    batch = make_batch(4)
    for bad in (n, -1):
        wrong = batch.domains.clone()
        wrong[1, 0] = bad
        with pytest.raises(ValueError, match=f"domain id {bad} is out of range"):
            model.score_batch(EncodedBatch(batch.sparse, batch.dense, wrong, batch.multi_hot))
    with pytest.raises(ValueError, match="domains must be"):
        model.score_batch(EncodedBatch(batch.sparse, batch.dense, batch.domains[:, 0], None))


def test_the_package_exports_the_entry_points() -> None:
    import mdlora.models as models

    assert models.MultiDomainModel is MultiDomainModel and models.EncodedBatch is EncodedBatch
    assert set(models.__all__) >= {"ModelConfig", "Division", "FeatureSpec", "SparseField"}


@pytest.mark.parametrize("method", ["mlora", "moe1", "moe3"])
def test_segment_layout_runs_every_layer_as_one_batched_gemm(
    method: str, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``segment`` (and ``merged`` on CUDA) lays the batch out in one-domain blocks once and
    runs each layer as one baddbmm, whatever the domains present; scores match the
    per-sample reference for many domains, skewed counts and blocks of any fill."""
    from mdlora.models.lora import SegmentPlan

    model = perturb(MultiDomainModel(make_config("deepfm", method))).eval().to(device)
    for n in range(2, 9):  # grow to 6 + 7 = 13 domains
        model.add_domain("occupation", f"extra{n}")
    batch = make_batch(700, n_primary=13, seed=3).to(device)
    skew = batch.domains[:, 0].clone()
    skew[: 500] = 4  # one big domain next to small ones
    batch.domains = torch.stack([skew, batch.domains[:, 1]], 1)
    model.set_routing("gather")
    ref = score(model, batch)
    built: list[SegmentPlan] = []
    original = SegmentPlan.__init__

    def spy(self: SegmentPlan, *args: object, **kw: object) -> None:
        original(self, *args, **kw)  # type: ignore[arg-type]
        built.append(self)

    monkeypatch.setattr(SegmentPlan, "__init__", spy)
    strategies = ["segment"] + (["merged"] if device.type == "cuda" else [])
    for strategy in strategies:
        built.clear()
        model.set_routing(strategy)
        got = score(model, batch)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert len(built) == 1, "one layout for the whole tower"
        plan = built[0]
        assert plan.num_blocks * plan.block >= len(batch)
        domain_of_slot = plan.block_domain[plan.slot // plan.block]
        assert torch.equal(domain_of_slot, batch.domains[:, 0])
        for block in (8, 64):  # any block size gives the same rows
            explicit = SegmentPlan(batch.domains[:, 0], 13, block=block)
            assert torch.equal(explicit.block_domain[explicit.slot // block], batch.domains[:, 0])
