"""The phase loop: each phase trains exactly its groups; early stopping restores the best."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mdlora.training.loop as loop
from mdlora.models.model import MultiDomainModel
from mdlora.training.loop import LoopSettings, Phase, to_batch, train_phase
from mdlora.training.run import build_model, plan_phases, resolve_hparams
from tests.training.helpers import tiny_config, tiny_prepared


def _increasing() -> Iterator[float]:
    value = 0.5
    while True:
        yield value
        value += 0.01


@pytest.fixture
def always_improving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every validation looks better than the last, so a phase keeps its last weights."""
    values = _increasing()
    monkeypatch.setattr(loop, "validation_metric", lambda *a, **k: next(values))


def _state(model: MultiDomainModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _setup(
    tmp_path: Path, method: str, device: torch.device = torch.device("cpu"), **kw: object
) -> tuple:
    """Config, hparams, a fresh model and the train / val splits, all on ``device``."""
    prepared = tiny_prepared(two_divisions=method in ("multilora", "singlelora"))
    cfg = tiny_config(tmp_path, method=method, **kw)
    hp = resolve_hparams(cfg, prepared)
    torch.manual_seed(0)
    model = build_model(cfg, prepared, hp).to(device)
    train = to_batch(prepared.train, device)
    val = to_batch(prepared.val, device)
    return cfg, hp, model, train, val


def _expected_changes(model: MultiDomainModel, phase: Phase) -> dict[str, list[int] | None]:
    """Parameter name -> rows that may change (None: the whole tensor)."""
    from mdlora.models.freeze import _group_tensors

    by_id = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, list[int] | None] = {}
    for g in phase.groups:
        for p, row in _group_tensors(model, g):
            name = by_id[id(p)]
            if row is None:
                out[name] = None
            elif out.get(name, []) is not None:
                out[name] = [*out.get(name, []), row]  # type: ignore[misc]
    return out


@pytest.mark.parametrize(
    ("method", "extra"),
    [("base", {}), ("mlora", {}), ("moe", {"experts_per_domain": 2}),
     ("multilora", {"tower_norm": "batch"})],
)  # fmt: skip
def test_each_phase_changes_only_its_groups(
    tmp_path: Path, method: str, extra: dict, always_improving: None, device: torch.device
) -> None:
    cfg, hp, model, train, val = _setup(tmp_path, method, device, **extra)
    phases = plan_phases(model, cfg, hp)
    assert phases[0].name == "backbone"
    settings = LoopSettings(batch_size=1024, l2=1e-3, patience=2, seed=0, progress=False)
    for i, ph in enumerate(phases):
        ph.epochs = 1  # one epoch: several steps (B moves first, A from the second step)
        before = _state(model)
        changes = _expected_changes(model, ph)
        res = train_phase(model, ph, train, val, settings, phase_index=i)
        assert res.epochs_run == 1 and res.best_epoch == 1
        after = model.state_dict()
        params = dict(model.named_parameters())
        for name, old in before.items():
            new = after[name]
            if name not in params:  # a buffer: only norms this phase trains may move
                owner = name.rsplit(".", 1)[0]
                trained = any(n.startswith(owner + ".") for n in changes)
                if not trained:
                    assert torch.equal(new, old), f"{ph.name}: frozen buffer {name} changed"
                continue
            if name not in changes:
                assert torch.equal(new, old), f"{ph.name}: frozen {name} changed"
            elif changes[name] is None:
                assert not torch.equal(new, old), f"{ph.name}: trainable {name} did not change"
            else:
                rows = changes[name]
                assert rows is not None
                others = torch.ones(new.shape[0], dtype=torch.bool, device=new.device)
                others[rows] = False
                assert torch.equal(new[others], old[others]), f"{ph.name}: other rows of {name}"
                assert not torch.equal(new[rows], old[rows]), f"{ph.name}: rows of {name} fixed"


def test_moe_expert_phase_trains_on_its_own_domain_only(tmp_path: Path) -> None:
    cfg, hp, model, _, _ = _setup(tmp_path, "moe", experts_per_domain=2)
    phases = {p.name: p for p in plan_phases(model, cfg, hp)}
    assert model.gate is not None
    for e in range(int(model.gate.num_experts)):
        ph = phases[f"expert:{e}"]
        assert ph.stage == "expert" and ph.expert == e and ph.groups == [f"expert:{e}"]
        assert ph.domains == [int(model.gate.owner[e])]
    assert phases["gate"].groups == ["gate"] and phases["gate"].domains is None


def test_multilora_and_singlelora_phase_plans(tmp_path: Path) -> None:
    cfg, hp, model, _, _ = _setup(tmp_path, "multilora")
    plan = [(p.name, p.stage, p.division, p.metric_column) for p in plan_phases(model, cfg, hp)]
    assert plan == [
        ("backbone", "backbone", None, 0), ("lora:domain", "lora", "domain", 0),
        ("lora:user_segment", "lora", "user_segment", 1), ("fusion", "fusion", None, 0),
    ]  # fmt: skip
    cfg, hp, model, _, _ = _setup(tmp_path, "singlelora")
    assert [p.name for p in plan_phases(model, cfg, hp)] == ["backbone", "lora:domain"]


def test_early_stopping_restores_the_best_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    _, _, model, train, val = _setup(tmp_path, "base", device)
    # start, the tenth-of-an-epoch look (recorded only), epochs 1, 2, ...
    scripted = iter([0.50, 0.95, 0.60, 0.80, 0.70, 0.75, 0.79, 0.99])
    states: list[dict[str, torch.Tensor]] = []

    def fake_metric(m: MultiDomainModel, *args: object) -> float:
        states.append(_state(m))
        return next(scripted)

    monkeypatch.setattr(loop, "validation_metric", fake_metric)
    ph = Phase("backbone", "backbone", ["backbone"], epochs=10)
    res = train_phase(model, ph, train, val, LoopSettings(batch_size=256, patience=3, seed=0,
                                                          progress=False))  # fmt: skip
    assert res.best_epoch == 2 and res.epochs_run == 5  # epochs 3, 4, 5 did not beat 0.80
    assert res.history == [0.50, 0.60, 0.80, 0.70, 0.75, 0.79]
    # the tenth look is reported but neither restored nor counted against patience
    assert res.tenth_metric == 0.95 and res.tenth_step == round(res.steps_per_epoch / 10)
    assert res.best_other_metric == 0.95 and res.best_other_step == res.tenth_step
    assert res.start_metric == 0.50 and res.best_step == 2 * res.steps_per_epoch
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[3].items())
    assert not all(torch.equal(final[k], v) for k, v in states[6].items())


def test_a_phase_that_never_improves_leaves_the_model_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, model, train, val = _setup(tmp_path, "mlora")
    values = iter([0.7, 0.65, 0.6, 0.6, 0.6])  # start, tenth, epochs 1-3
    monkeypatch.setattr(loop, "validation_metric", lambda *a, **k: next(values))
    before = _state(model)
    ph = Phase("adapters", "adapters", ["experts"], epochs=5)
    res = train_phase(model, ph, train, val, LoopSettings(batch_size=256, patience=3,
                                                          progress=False))  # fmt: skip
    assert res.best_epoch == 0 and res.epochs_run == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_l2_term_covers_embeddings_linear_and_cross_only(tmp_path: Path) -> None:
    _, _, model, _, _ = _setup(tmp_path, "base", backbone="dcn")
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = sorted(names[id(p)] for p in loop.l2_parameters(model))
    assert chosen == [
        "dense_linear.weight", "embedding.weight", "interaction.cross.kernels", "linear.weight"
    ]


def test_l2_as_adams_weight_decay_trains_as_the_explicit_term(
    tmp_path: Path, device: torch.device
) -> None:
    """Whole tensors take L2 as Adam's coupled weight decay (a dozen kernels a step fewer):
    the same steps as ``loss + l2 * sum(p**2)`` to float rounding."""
    import torch.nn.functional as F

    from mdlora.models.freeze import set_trainable

    _, _, model, train, _ = _setup(tmp_path, "base", device, backbone="dcn")
    other = _setup(tmp_path, "base", device, backbone="dcn")[2]
    other.load_state_dict(model.state_dict())
    start = _state(model)
    l2 = 0.05  # large, so a missing or doubled term shows
    runs = []
    for m, as_decay in ((model, True), (other, False)):
        params = set_trainable(m, ["backbone"])
        reg = [p for p in loop.l2_parameters(m) if p.requires_grad]
        assert len(reg) == 4
        opt = loop.make_adam(params, 1e-2, l2, reg) if as_decay else loop.make_adam(params, 1e-2)
        m.eval()  # no dropout: both runs see the same function
        for i in range(5):
            b = train.select(torch.arange(i * 64, (i + 1) * 64, device=device))
            assert b.labels is not None
            logits = m(b.sparse, b.dense, b.domains, b.multi_hot)
            loss = F.binary_cross_entropy_with_logits(logits, b.labels)
            if not as_decay:
                loss = loss + l2 * sum(p.square().sum() for p in reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        runs.append(_state(m))
    for k, v in runs[0].items():
        torch.testing.assert_close(v, runs[1][k], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(runs[0]["embedding.weight"], start["embedding.weight"])


def test_amp_on_cpu_trains_with_bfloat16_autocast(tmp_path: Path) -> None:
    _, _, model, train, val = _setup(tmp_path, "base")
    ph = Phase("backbone", "backbone", ["backbone"], epochs=1)
    res = train_phase(model, ph, train, val, LoopSettings(batch_size=256, amp=True,
                                                          progress=False))  # fmt: skip
    assert res.epochs_run == 1 and res.best_metric is not None


def test_eval_every_validates_stops_and_restores_at_step_granularity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, model, train, val = _setup(tmp_path, "base")
    # start, tenth (step 3), steps 5, 10 (best), 15, 20: patience 2 stops mid epoch 1
    scripted = iter([0.50, 0.60, 0.70, 0.90, 0.80, 0.85, 0.99])
    states: list[dict[str, torch.Tensor]] = []

    def fake_metric(m: MultiDomainModel, *args: object) -> float:
        states.append(_state(m))
        return next(scripted)

    monkeypatch.setattr(loop, "validation_metric", fake_metric)
    ph = Phase("backbone", "backbone", ["backbone"], epochs=3)
    settings = LoopSettings(batch_size=256, patience=2, seed=0, progress=False, eval_every=5)
    res = train_phase(model, ph, train, val, settings)
    assert res.steps_per_epoch > 20 and res.tenth_step == 3  # not a multiple of 5: one look
    assert [t["step"] for t in res.trajectory] == [0, 3, 5, 10, 15, 20]
    assert [t["kind"] for t in res.trajectory] == ["start", "tenth", *["eval"] * 4]
    assert res.tenth_metric == 0.60 and res.history == [0.50, 0.70, 0.90, 0.80, 0.85]
    assert res.best_metric == 0.90 and res.best_step == 10 and res.epochs_run == 1
    # restore: the weights of the best evaluation (step 10), not the last one (step 20)
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[3].items())
    assert not all(torch.equal(final[k], v) for k, v in states[5].items())


def test_eval_every_restores_a_mid_epoch_best_and_stops_on_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, model, train, val = _setup(tmp_path, "base")
    values = iter([0.50, 0.80, 0.70, 0.60, 0.60, 0.60])  # start, 4 (best = tenth), 8, 12, ...
    states: list[dict[str, torch.Tensor]] = []

    def fake_metric(m: MultiDomainModel, *args: object) -> float:
        states.append(_state(m))
        return next(values)

    monkeypatch.setattr(loop, "validation_metric", fake_metric)
    ph = Phase("backbone", "backbone", ["backbone"], epochs=5)
    settings = LoopSettings(batch_size=128, patience=3, seed=0, progress=False, eval_every=4)
    train_small = train.select(torch.arange(128 * 40))  # 40 steps an epoch: the tenth is 4
    res = train_phase(model, ph, train_small, val, settings)
    assert res.tenth_step == 4 and [t["kind"] for t in res.trajectory][1] == "eval"
    assert res.history == [0.50, 0.80, 0.70, 0.60, 0.60] and len(res.trajectory) == 5
    assert res.best_step == 4 and res.best_epoch == 1 and res.tenth_metric == 0.80
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[1].items())
    assert not all(torch.equal(final[k], v) for k, v in states[4].items())


def test_the_default_records_a_real_tenth_of_an_epoch_trajectory(tmp_path: Path) -> None:
    _, _, model, train, val = _setup(tmp_path, "base")
    ph = Phase("backbone", "backbone", ["backbone"], epochs=2)
    res = train_phase(model, ph, train, val, LoopSettings(batch_size=256, patience=3,
                                                          progress=False))  # fmt: skip
    steps = res.steps_per_epoch
    assert [(t["step"], t["kind"]) for t in res.trajectory] == [
        (0, "start"), (round(steps / 10), "tenth"), (steps, "epoch"), (2 * steps, "epoch")
    ]  # fmt: skip
    aucs = [t["auc"] for t in res.trajectory]
    assert all(0.4 < a < 1.0 for a in aucs) and len(set(aucs)) == 4
    assert res.best_other_metric == max(aucs[1:]) and res.train_rows == len(train)
