"""The grouped kernel of the segmented tower (``mdlora.models.grouped``): on CUDA the real
Triton kernel, on CPU the same kernel under ``TRITON_INTERPRET=1``; both must equal the eager
per-sample computation to float rounding."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

from mdlora.models import grouped
from mdlora.models.features import EncodedBatch
from mdlora.models.lora import SegmentPlan
from mdlora.models.model import MultiDomainModel
from tests.models.helpers import make_batch, make_config, perturb


@pytest.fixture
def kernel(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.device]:
    """The grouped kernel runnable on ``device`` (interpreted on CPU)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' brings it)")
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MDLORA_GROUPED_STRICT", "1")  # a kernel's failure fails the test
    grouped.reset()
    yield device
    grouped.reset()


def score(model: MultiDomainModel, batch: EncodedBatch) -> torch.Tensor:
    with torch.no_grad():
        return model.score_batch(batch)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x.unsqueeze(1), w[idx]).squeeze(1) + b[idx]


@pytest.mark.parametrize(
    ("n", "domains", "k_in", "n_out"),
    [
        (300, 5, 48, 40),  # widths that are no multiple of the tiles
        (37, 9, 32, 8),  # blocks of 8 rows (smaller than a 16-row tile), a narrow layer
        (1000, 3, 70, 130),  # 64-row tiles, two output tiles and a ragged third
    ],
)
@pytest.mark.parametrize("gather_in", [False, True])
@pytest.mark.parametrize("scatter_out", [False, True])
def test_grouped_linear_equals_the_per_sample_layer(
    kernel: torch.device, n: int, domains: int, k_in: int, n_out: int, gather_in: bool,
    scatter_out: bool,
) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(0, domains, (n,), generator=g)
    idx[idx == 1] = 0  # a domain with no sample
    x = torch.randn(n, k_in, generator=g)
    w = torch.randn(domains, k_in, n_out, generator=g)
    b = torch.randn(domains, n_out, generator=g)
    x, w, b, idx = x.to(kernel), w.to(kernel), b.to(kernel), idx.to(kernel)
    plan = SegmentPlan(idx, domains)
    want = torch.relu(reference(x, w, b, idx))
    with torch.no_grad():  # the kernels run with autograd off only
        got = grouped.grouped_linear(
            x if gather_in else plan.scatter(x), w, b, plan,
            gather_in=gather_in, scatter_out=scatter_out, relu=True,
        )  # fmt: skip
    assert got is not None
    rows = got if scatter_out else plan.gather(got)
    assert rows.shape == (n, n_out)
    torch.testing.assert_close(rows, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("mlora", {}),
        ("moe3", {}),
        ("mlora", {"tower_norm": "batch"}),  # a norm between layer and ReLU: not fused
        ("moe1", {"activation": "tanh"}),
    ],
)
def test_the_segmented_tower_on_the_kernel_scores_as_the_eager_one(
    kernel: torch.device, method: str, extra: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = perturb(MultiDomainModel(make_config("deepfm", method, **extra))).eval().to(kernel)
    for i in range(4):  # 6 + 4 domains, skewed counts
        model.add_domain("occupation", f"extra{i}")
    batch = make_batch(500, n_primary=10, seed=5).to(kernel)
    primary = batch.domains[:, 0].clone()
    primary[:300] = 2
    batch.domains = torch.stack([primary, batch.domains[:, 1]], 1)
    model.set_routing("gather")
    want = score(model, batch)
    model.set_routing("segment")
    calls: list[bool] = []
    original = grouped.grouped_linear

    def counted(*args: object, **kw: object) -> torch.Tensor | None:
        out = original(*args, **kw)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(grouped, "grouped_linear", counted)
    got = score(model, batch)
    assert calls == [True] * len(model.config.tower), "one kernel launch per tower layer"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_kernel_stays_out_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    grouped.reset()
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert not grouped.available(x)  # a CPU tensor, not interpreted
    if importlib.util.find_spec("triton") is None:
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        assert grouped.available(x)
        assert not grouped.available(x.double())  # float32 only
        monkeypatch.setattr(grouped, "ENABLED", False)  # MDLORA_GROUPED_KERNEL=0
        assert not grouped.available(x)
    monkeypatch.setattr(grouped, "ENABLED", True)
    assert not grouped.available(x)  # autograd on: the kernels have no backward
    grouped.reset()


class _Broken:
    """A kernel that cannot compile here (an unsupported GPU, a Triton that refuses it)."""

    def __getitem__(self, grid: object) -> object:
        def launch(*args: object, **kw: object) -> None:
            raise RuntimeError("no kernel image is available for execution on the device")

        return launch


def test_a_kernel_that_cannot_run_leaves_scoring_on_the_eager_path(
    kernel: torch.device, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = perturb(MultiDomainModel(make_config("deepfm", "mlora"))).eval().to(kernel)
    batch = make_batch(300, seed=2).to(kernel)
    model.set_routing("gather")
    want = score(model, batch)
    model.set_routing("segment")
    monkeypatch.delenv("MDLORA_GROUPED_STRICT")
    monkeypatch.setattr(grouped, "_kernel", lambda: dict.fromkeys(("linear", "count", "place"),
                                                                   _Broken()))  # fmt: skip
    with caplog.at_level("WARNING", logger="mdlora.models.grouped"):
        got = score(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert grouped.BROKEN is not None and "no kernel image" in grouped.BROKEN
    assert "grouped kernels off for this process" in caplog.text
    assert not grouped.runs_on(kernel)  # and they stay off: no second failure per call
    torch.testing.assert_close(score(model, batch), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("n", "domains", "block"),
    [(300, 5, None), (37, 9, 8), (5000, 3, 128), (0, 4, None), (64, 1, 16), (900, 200, None)],
)
def test_the_kernel_layout_places_rows_as_the_eager_one(
    kernel: torch.device, n: int, domains: int, block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton layout (counts, slots by atomic cursors, block domains by binary search,
    padding marks) gives each domain the eager layout's blocks and slots; only the order of
    a domain's rows inside them may differ."""
    g = torch.Generator().manual_seed(n + domains)
    idx = torch.randint(0, domains, (n,), generator=g)
    if domains > 2:
        idx[idx == 1] = 0  # a domain with no row
    idx = idx.to(kernel)
    fast = SegmentPlan(idx, domains, block)
    assert grouped.layout(idx, domains, fast.block, fast.num_blocks) is not None, "the kernels"
    monkeypatch.setattr(grouped, "ENABLED", False)
    eager = SegmentPlan(idx, domains, block)
    assert (fast.block, fast.num_blocks) == (eager.block, eager.num_blocks)
    assert torch.equal(fast.block_domain, eager.block_domain)
    assert torch.equal(fast.used_blocks, eager.used_blocks)
    assert torch.equal(fast.sample_of_slot == -1, eager.sample_of_slot == -1)
    assert torch.equal(fast.sample_of_slot[fast.slot], torch.arange(n, device=kernel))
    for d in range(domains):  # the same slots, whatever order the rows took them in
        mine = idx == d
        assert torch.equal(fast.slot[mine].sort().values, eager.slot[mine].sort().values)
    assert torch.equal(fast.block_domain[fast.slot // fast.block], idx)


@pytest.mark.parametrize(
    ("block", "n_out", "flags", "capability"),
    [
        (8, 64, (True, False, True), 90),  # H100 / H200: a masked 16-row tile
        (128, 128, (False, False, False), 90),  # two 64-row tiles per block
        (32, 40, (False, True, True), 80),  # A100: a ragged output tile
    ],
)
def test_the_grouped_kernel_compiles_for_datacenter_gpus(
    block: int, n_out: int, flags: tuple[bool, bool, bool], capability: int
) -> None:
    """Triton compiles the kernel to a CUDA binary here, with no GPU: what the interpreter
    cannot check (tile shapes ``tl.dot`` accepts, types, the lowering) is checked in CI."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip(f"triton {triton.__version__} has no ahead-of-time compile API")
    if grouped._interpreting():
        pytest.skip("TRITON_INTERPRET is set: there is no compiler to check")
    kernels = grouped._build()
    assert kernels is not None
    constants = {**grouped.launch_constants(block, n_out),
                 **dict(zip(("GATHER_IN", "SCATTER_OUT", "RELU"), flags, strict=True))}  # fmt: skip
    layout = {"BM": block, "ROWS": grouped.LAYOUT_ROWS, "BLOCKS": grouped.LAYOUT_BLOCKS}
    for name, given in (("linear", constants), ("count", {"ROWS": grouped.LAYOUT_ROWS}),
                        ("place", layout)):  # fmt: skip
        kernel = kernels[name]
        names = kernel.arg_names
        signature = {a: POINTERS.get(a, "i32") for a in names}
        signature.update(dict.fromkeys(given, "constexpr"))
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(k),): v for k, v in given.items()})  # fmt: skip
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
        assert compiled.asm["cubin"], f"no CUDA binary for the {name} kernel"


#: the kernels' pointer arguments and their element types
POINTERS = {
    "x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32",
    "block_domain_ptr": "*i64", "rows_ptr": "*i64", "used_ptr": "*i64", "idx_ptr": "*i64",
    "counts_ptr": "*i32", "cursor_ptr": "*i32", "ends_ptr": "*i64", "first_ptr": "*i64",
    "slot_ptr": "*i64", "sample_ptr": "*i64",
}  # fmt: skip


def test_a_block_size_that_is_no_power_of_two_still_scores(kernel: torch.device) -> None:
    """An explicit block of 24 rows: the layout falls back to eager ops (its kernel needs a
    power of two), the layer kernel masks a 32-row tile."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 3, (200,), generator=g).to(kernel)
    x, w, b = (torch.randn(*shape, generator=g).to(kernel) for shape in ((200, 20), (3, 20, 24),
                                                                        (3, 24)))  # fmt: skip
    plan = SegmentPlan(idx, 3, block=24)
    assert grouped.layout(idx, 3, 24, plan.num_blocks) is None
    with torch.no_grad():
        got = grouped.grouped_linear(x, w, b, plan, gather_in=True, scatter_out=True)
    assert got is not None
    torch.testing.assert_close(got, reference(x, w, b, idx), atol=2e-5, rtol=1e-5)


def test_a_kernel_that_computes_wrongly_is_caught_by_the_first_check(
    kernel: torch.device, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The process's first kernel result is compared with the eager path on its own layout:
    right, the kernels stay on; wrong (a GPU or Triton where they miscompute), they are off
    and the scores are the eager path's, never the wrong ones."""
    model = perturb(MultiDomainModel(make_config("deepfm", "moe3"))).eval().to(kernel)
    batch = make_batch(300, seed=4).to(kernel)
    model.set_routing("gather")
    want = score(model, batch)
    model.set_routing("segment")
    torch.testing.assert_close(score(model, batch), want, atol=1e-5, rtol=0)
    assert grouped.VERIFIED and grouped.BROKEN is None

    grouped.reset()  # a new process, whose kernel is off by a factor
    right = grouped.grouped_linear

    def wrong(*args: object, **kw: object) -> torch.Tensor | None:
        out = right(*args, **kw)  # type: ignore[arg-type]
        return None if out is None else out * 1.01

    monkeypatch.setattr(grouped, "grouped_linear", wrong)
    with pytest.raises(AssertionError, match="differs from the eager path"):
        score(model, batch)  # the tests' strict mode: raised
    grouped.reset()
    monkeypatch.delenv("MDLORA_GROUPED_STRICT")
    with caplog.at_level("WARNING", logger="mdlora.models.grouped"):
        got = score(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert grouped.BROKEN is not None and "differs from the eager path" in caplog.text
    assert not grouped.runs_on(kernel)


def test_each_block_size_is_checked_on_its_first_result(
    kernel: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton compiles a variant per block size: one that computes wrongly is caught on its
    own first result, even after another size passed."""
    from mdlora.models.lora import segment_block

    model = perturb(MultiDomainModel(make_config("deepfm", "mlora"))).eval().to(kernel)
    model.set_routing("segment")
    small, large = make_batch(40, seed=6).to(kernel), make_batch(600, seed=7).to(kernel)
    n_dom = len(model.config.divisions[0].domains)
    b_small, b_large = segment_block(40, n_dom), segment_block(600, n_dom)
    assert b_small != b_large
    grouped.reset()
    score(model, small)
    assert set(grouped.VERIFIED) == {b_small}
    right = grouped.grouped_linear

    def wrong_for_large(*args: object, **kw: object) -> torch.Tensor | None:
        out = right(*args, **kw)  # type: ignore[arg-type]
        plan = args[3]
        return None if out is None else out * (1.05 if plan.block == b_large else 1.0)  # type: ignore[attr-defined]

    monkeypatch.setattr(grouped, "grouped_linear", wrong_for_large)
    with pytest.raises(AssertionError, match="differs from the eager path"):
        score(model, large)
    assert set(grouped.VERIFIED) == {b_small, b_large}
    grouped.reset()


def test_the_first_check_allows_for_a_tf32_reference_only_where_matmuls_use_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With TF32 matmuls (``set_float32_matmul_precision("high")``, common in production) the
    eager reference is off by about 1e-3 itself: the check then allows for that rounding, not
    for a kernel that computes wrongly."""
    monkeypatch.delenv("MDLORA_GROUPED_STRICT", raising=False)
    g = torch.Generator().manual_seed(5)
    want = torch.randn(256, 16, generator=g)
    rounded = want * (1 + 3e-3 * torch.randn(256, 16, generator=g))
    assert not grouped.tf32_matmul(torch.device("cpu"))
    grouped.reset()
    assert not grouped.verify(rounded, want)  # IEEE reference: 3e-3 is a wrong kernel
    monkeypatch.setattr(grouped, "tf32_matmul", lambda device: True)
    grouped.reset()
    assert grouped.verify(rounded, want)
    grouped.reset()
    assert not grouped.verify(want * 1.05, want)  # still caught
    grouped.reset()
