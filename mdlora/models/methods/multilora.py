"""MultiLoRA (Song et al., CIKM 2024): LoRA sets under two domain divisions, fused by attention.

Each adapted tower layer gets, per division, a LoRA with a row scale and a bias
(``h' = (W0 x + b0) + s (.) (U D x) + e``) and a batch norm per domain; the fusion stage mixes
the two sets' outputs with attention and normalises per cell of the two divisions
(``nat * n_aux + aux``). Stages: ``backbone``, ``lora`` (one division's set at a time),
``fusion``; SingleLoRA ends after the natural division's ``lora`` stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mdlora.models.methods.base import DomainPhase, Method, Slot

if TYPE_CHECKING:
    from mdlora.models.model import ModelConfig, MultiDomainModel

NORM_STATE = ("weight", "bias", "running_mean", "running_var")


class MultiLoRA(Method):
    name = "multilora"
    label = "MultiLoRA"
    stages = ("backbone", "lora", "fusion")
    final_stage = "fusion"
    adapted = 2
    #: not yet: a copy's domain-norm cells are not reproduced exactly (0.004 off, measured)
    exact_domain_copy = False

    def check(self, config: ModelConfig) -> None:
        if len(config.divisions) < 2:
            raise ValueError("multilora needs two divisions (natural, auxiliary)")

    def attach(self, model: MultiDomainModel) -> None:
        cfg, tower = model.config, model.tower
        for div in cfg.divisions[:2]:
            n = len(div.domains)
            tower.lora_sets[div.name] = tower.add_banks(n, cfg.lora_ranks(), row_scale=True)
            tower.domain_norms[f"div:{div.name}"] = tower.add_domain_norms(n)
        n_cells = len(cfg.divisions[0].domains) * len(cfg.divisions[1].domains)
        tower.domain_norms["cell"] = tower.add_domain_norms(n_cells)
        tower.fusions = tower.add_fusions(cfg.fusion_rank, cfg.fusion)

    def grow(self, model: MultiDomainModel, div_i: int, gate_scope: str) -> None:
        if div_i >= 2:
            return
        div = model.config.divisions[div_i]
        for bank in model.tower.lora_banks(div.name):
            bank.grow(1)
        for norm in model.tower.norm_layers(f"div:{div.name}"):
            norm.grow(1)
        _regrid_cells(model, div_i)

    def phase_groups(self, model: MultiDomainModel) -> dict[str, list[str]]:
        phases: dict[str, list[str]] = {"backbone": ["backbone"]}
        for div in model.config.divisions[:2]:
            phases[f"lora:{div.name}"] = [f"lora:{div.name}", f"norms:div:{div.name}"]
        phases["fusion"] = ["fusion", "norms:cell"]
        return phases

    def slots(self, model: MultiDomainModel, division: str, d: int) -> dict[str, Slot]:
        out: dict[str, Slot] = {}
        for i, bank in enumerate(model.tower.lora_banks(division)):
            assert bank.scale is not None
            out[f"tower.{i}.lora_A"] = (bank.A, d)
            out[f"tower.{i}.lora_B"] = (bank.B, d)
            out[f"tower.{i}.bias"] = (bank.bias, d)
            out[f"tower.{i}.scale"] = (bank.scale, d)
        for i, norm in enumerate(model.tower.norm_layers(f"div:{division}")):
            for attr in NORM_STATE:
                out[f"norm.{i}.{attr}"] = (getattr(norm, attr), d)
        return out

    def domain_phases(
        self, model: MultiDomainModel, division: str, d: int, final_stage: str, gate_scope: str
    ) -> list[DomainPhase]:
        """Its LoRA and domain norms in that division; then (unless the model ends in a
        ``lora`` stage, SingleLoRA) its fusion norm cells."""
        cfg = model.config
        div_i = cfg.division_index(division)
        groups = [f"lora:{division}:{d}", f"norms:div:{division}:{d}"]
        phases = [DomainPhase("lora", "lora", groups, division=division, metric_column=div_i)]
        if final_stage == "fusion":
            n_nat = len(cfg.divisions[0].domains)
            n_aux = len(cfg.divisions[1].domains)
            cells = ([d * n_aux + a for a in range(n_aux)] if div_i == 0
                     else [n * n_aux + d for n in range(n_nat)])  # fmt: skip
            phases.append(DomainPhase("fusion", "fusion", [f"norms:cell:{c}" for c in cells],
                                      metric_column=div_i))  # fmt: skip
        return phases


def _regrid_cells(model: MultiDomainModel, grown: int) -> None:
    """Re-lay the cell norms (``nat * n_aux + aux``) after division ``grown`` got a domain."""
    n_nat = len(model.config.divisions[0].domains)
    n_aux = len(model.config.divisions[1].domains)
    new_nat, new_aux = n_nat + (grown == 0), n_aux + (grown == 1)
    old_cells = torch.arange(n_nat * n_aux)
    nat, aux = old_cells // n_aux, old_cells % n_aux
    new_pos = nat * new_aux + aux
    fresh = model.tower.add_domain_norms(new_nat * new_aux).to(model.device)
    fresh.train(model.training)
    for old, new in zip(model.tower.norm_layers("cell"), fresh, strict=False):
        for attr in NORM_STATE:
            getattr(new, attr).data[new_pos] = getattr(old, attr).data
    model.tower.domain_norms["cell"] = fresh
