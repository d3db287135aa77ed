"""MoE-MLoRA (Yaggel et al., 2025): k experts per domain, mixed by a softmax gate.

Expert ``e`` belongs to domain ``e mod n`` (``DomainGate.owner``). Stages: ``backbone``, then
``expert`` (one expert active at a time, trained on its domain's rows only), then ``gate``
(backbone and experts frozen; ``g = softmax(Linear(Embedding(d)))`` over the experts,
``h = act(dropout(x W + b) + sum_i g_i (x A_i B_i + c_i))``). A domain added later gets its
experts and a gate row that sees its own experts (``gate_scope="own"``) or all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mdlora.models.gate import DomainGate
from mdlora.models.methods.base import DomainPhase, Method, Slot

if TYPE_CHECKING:
    from mdlora.models.model import ModelConfig, MultiDomainModel


class MoE(Method):
    name = "moe"
    label = "MoE-MLoRA"
    stages = ("backbone", "expert", "gate")
    final_stage = "gate"
    adapted = 1
    neutral_new_domain = True  # its experts start at zero, whatever the gate mixes
    exact_domain_copy = True  # for gate rows that see only their own experts (scope "own")
    has_experts = True

    def experts(self, config: ModelConfig) -> int:
        return config.experts_per_domain

    def attach(self, model: MultiDomainModel) -> None:
        cfg = model.config
        n = len(cfg.divisions[0].domains)
        model.tower.banks = model.tower.add_banks(n * cfg.experts_per_domain, cfg.lora_ranks())
        model.gate = DomainGate(n, n * cfg.experts_per_domain, cfg.gate_dim)

    def grow(self, model: MultiDomainModel, div_i: int, gate_scope: str) -> None:
        if div_i == 0:
            assert model.gate is not None
            for bank in model.tower.primary_banks():
                bank.grow(model.config.experts_per_domain)
            model.gate.grow(model.config.experts_per_domain, gate_scope)

    def phase_groups(self, model: MultiDomainModel) -> dict[str, list[str]]:
        phases: dict[str, list[str]] = {"backbone": ["backbone"]}
        for e in range(model.tower.primary_banks()[0].num_experts):
            phases[f"expert:{e}"] = [f"expert:{e}"]
        phases["gate"] = ["gate"]
        return phases

    def adapter_rows(self, model: MultiDomainModel, d: int) -> list[int]:
        assert model.gate is not None
        return [int(e) for e in (model.gate.owner == d).nonzero().squeeze(1).tolist()]

    def slots(self, model: MultiDomainModel, division: str, d: int) -> dict[str, Slot]:
        assert model.gate is not None
        rows = self.adapter_rows(model, d)
        out: dict[str, Slot] = {}
        for i, bank in enumerate(model.tower.primary_banks()):
            for j, e in enumerate(rows):
                out[f"tower.{i}.experts.{j}.lora_A"] = (bank.A, e)
                out[f"tower.{i}.experts.{j}.lora_B"] = (bank.B, e)
                out[f"tower.{i}.experts.{j}.bias"] = (bank.bias, e)
        out["gate.embedding"] = (model.gate.embedding.weight, d)
        out["gate.proj_weight"] = (model.gate.proj.weight, rows)
        out["gate.proj_bias"] = (model.gate.proj.bias, rows)
        return out

    def domain_phases(
        self, model: MultiDomainModel, division: str, d: int, final_stage: str, gate_scope: str
    ) -> list[DomainPhase]:
        """Each of the domain's experts alone, then its gate row (skipped when the row sees
        only the domain's own single expert: there is nothing to mix)."""
        experts = self.adapter_rows(model, d)
        phases = [DomainPhase(f"expert:{e}", "expert", [f"expert:{e}"], expert=e) for e in experts]
        if not (gate_scope == "own" and len(experts) == 1):
            phases.append(DomainPhase("gate", "gate", [f"gate_row:{d}"]))
        return phases
