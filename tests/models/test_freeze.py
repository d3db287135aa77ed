"""Freezing per phase: exactly the named groups train, everything else stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from mdlora.models.freeze import (
    phase_groups,
    phase_parameter_counts,
    set_trainable,
    trainable_parameter_count,
)
from mdlora.models.model import MultiDomainModel
from mdlora.training.loop import make_adam
from tests.models.helpers import SPEC, make_batch, make_config, perturb


def stage_for(phase: str) -> dict[str, object]:
    name, _, rest = phase.partition(":")
    if name == "backbone":
        return {"name": "backbone"}
    if name == "adapters":
        return {"name": "adapters"}
    if name == "expert":
        return {"name": "expert", "expert": int(rest)}
    if name == "gate":
        return {"name": "gate"}
    if name == "lora":
        return {"name": "lora", "division": rest}
    return {"name": "fusion"}


def one_step(model: MultiDomainModel, groups: list[str]) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    params = set_trainable(model, groups)
    opt = make_adam(params, lr=1e-2)  # the optimiser every training phase uses (fused)
    batch = make_batch(256)
    model.train()
    logits = model(batch.sparse, batch.dense, batch.domains, batch.multi_hot)
    assert batch.labels is not None
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return before


def rows_of(group: str) -> int | None:
    parts = group.split(":")
    if parts[0] in ("expert", "gate_row"):
        return int(parts[1])
    return None


@pytest.mark.parametrize("method", ["base", "mlora", "moe3", "multilora"])
def test_one_step_changes_exactly_the_phase_parameters(method: str) -> None:
    model = perturb(MultiDomainModel(make_config("deepfm", method, dropout=0.2)))
    phases = phase_groups(model)
    if method == "moe3":  # every expert phase behaves alike; check a first, middle and last one
        experts = [p for p in phases if p.startswith("expert:")]
        keep = {experts[0], experts[len(experts) // 2], experts[-1]}
        phases = {k: v for k, v in phases.items() if not k.startswith("expert:") or k in keep}
    for phase, groups in phases.items():
        model.set_stage(**stage_for(phase))  # type: ignore[arg-type]
        before = one_step(model, groups)
        row = rows_of(groups[0])
        inside = {id(p) for p in set_trainable(model, groups)}
        for name, p in model.named_parameters():
            old = before[name]
            if id(p) not in inside:
                assert torch.equal(p, old), f"{phase}: frozen {name} changed"
            elif row is None:
                assert not torch.equal(p, old), f"{phase}: trainable {name} did not change"
            else:
                others = torch.ones(p.shape[0], dtype=torch.bool)
                others[row] = False
                assert torch.equal(p[others], old[others]), f"{phase}: other rows of {name} moved"
                assert not torch.equal(p[row], old[row]), f"{phase}: row {row} of {name} did not"


def test_buffers_of_frozen_norms_do_not_count_as_parameters() -> None:
    model = MultiDomainModel(make_config("mlp", "multilora"))
    set_trainable(model, ["fusion"])
    assert all(not p.requires_grad for n, p in model.named_parameters() if "domain_norms" in n)


def test_unknown_group_is_refused() -> None:
    model = MultiDomainModel(make_config("deepfm", "mlora"))
    with pytest.raises(ValueError, match="unknown parameter group"):
        set_trainable(model, ["everything"])
    with pytest.raises(ValueError, match="no gate"):
        set_trainable(model, ["gate"])
    with pytest.raises(ValueError, match="out of range"):
        set_trainable(model, ["expert:99"])


def test_trainable_counts_match_hand_computation() -> None:
    """DeepFM, MLoRA, ranks (4, 2), tower 32-16, 6 domains, embedding dim 4."""
    model = MultiDomainModel(make_config("deepfm", "mlora"))
    k = 4
    vocab = sum(f.vocab_size for f in SPEC.sparse) + sum(m.vocab_size for m in SPEC.multi_hot)
    fields = len(SPEC.sparse) + len(SPEC.multi_hot)
    tower_in = fields * k + len(SPEC.dense)  # 4 fields x 4 + 1 dense = 17
    embeddings = vocab * k + vocab * 1 + len(SPEC.dense)  # second-order, first-order, dense linear
    tower = (tower_in * 32 + 32) + (32 * 16 + 16)
    head = 16 + 1
    adapters = 6 * ((tower_in * 4 + 4 * 32 + 32) + (32 * 2 + 2 * 16 + 16))
    counts = phase_parameter_counts(model)
    assert counts == {"backbone": embeddings + tower + head, "adapters": adapters}

    set_trainable(model, ["expert:2"])
    assert trainable_parameter_count(model) == adapters // 6


def test_moe_phase_counts() -> None:
    model = MultiDomainModel(make_config("mlp", "moe3", gate_dim=4))
    counts = phase_parameter_counts(model)
    experts = 6 * 3
    assert sum(1 for p in counts if p.startswith("expert:")) == experts
    per_expert = counts["expert:0"]
    bank_size = sum(p.numel() for bank in model.tower.primary_banks() for p in bank.parameters())
    assert per_expert * experts == bank_size
    assert counts["gate"] == 6 * 4 + (4 * experts + experts)
