"""MLoRA (Yang et al., RecSys 2024): one low-rank adapter per domain on every tower layer.

``h = act(dropout(x W + b) + x A[d] B[d] + c[d])``: A random, B and c zero, so a new adapter
starts as the backbone. Stages: ``backbone`` (phase 1), then ``adapters`` (every domain's
adapter at once, mixed batches, backbone frozen). Adapters are rows of stacked banks
(``mdlora.models.lora``), routed per sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mdlora.models.methods.base import DomainPhase, Method, Slot

if TYPE_CHECKING:
    from mdlora.models.model import MultiDomainModel


class MLoRA(Method):
    name = "mlora"
    label = "MLoRA"
    stages = ("backbone", "adapters")
    final_stage = "adapters"
    adapted = 1
    neutral_new_domain = True  # B and c start at zero
    exact_domain_copy = True

    def attach(self, model: MultiDomainModel) -> None:
        n = len(model.config.divisions[0].domains)
        model.tower.banks = model.tower.add_banks(n, model.config.lora_ranks())

    def grow(self, model: MultiDomainModel, div_i: int, gate_scope: str) -> None:
        if div_i == 0:
            for bank in model.tower.primary_banks():
                bank.grow(1)

    def phase_groups(self, model: MultiDomainModel) -> dict[str, list[str]]:
        return {"backbone": ["backbone"], "adapters": ["experts"]}

    def slots(self, model: MultiDomainModel, division: str, d: int) -> dict[str, Slot]:
        out: dict[str, Slot] = {}
        for i, bank in enumerate(model.tower.primary_banks()):
            out[f"tower.{i}.lora_A"] = (bank.A, d)
            out[f"tower.{i}.lora_B"] = (bank.B, d)
            out[f"tower.{i}.bias"] = (bank.bias, d)
        return out

    def domain_phases(
        self, model: MultiDomainModel, division: str, d: int, final_stage: str, gate_scope: str
    ) -> list[DomainPhase]:
        return [DomainPhase("adapters", "adapters", [f"expert:{d}"])]
