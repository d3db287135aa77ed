"""Explicit freezing: exactly which parameter groups train in a phase.

Groups (a phase names several):

* ``embeddings`` (field embeddings and the first-order/wide weights), ``interaction``,
  ``tower`` (shared tower weights and shared norms), ``head``; ``backbone`` is all four;
* ``experts`` (every row of the MLoRA/MoE banks), ``expert:<e>`` (row ``e`` only);
* ``gate``, ``gate_row:<d>`` (the gate's domain-embedding row ``d`` only);
* ``lora:<division>``, ``lora:<division>:<d>`` (MultiLoRA sets, or one domain's row);
* ``norms`` (all domain norms), ``norms:<set>`` (``div:<division>`` or ``cell``),
  ``norms:<set>:<d>``; ``fusion``;
* ``rows:<division>:<domain>`` (the embedding rows grown for an added domain,
``mdlora.models.rows``).

Row groups train one slice of a stacked tensor: the tensor gets ``requires_grad`` and a hook
zeroes the gradient of every other row. With a fresh optimiser and no weight decay on those
tensors (Adam, SGD), the other rows then stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import torch
from torch import Tensor, nn

from mdlora.models.model import MultiDomainModel

BACKBONE_GROUPS = ("embeddings", "interaction", "tower", "head")


def _group_tensors(model: MultiDomainModel, group: str) -> list[tuple[nn.Parameter, int | None]]:
    """``(parameter, row or None)`` pairs of one group; row None means the whole tensor."""
    parts = group.split(":")
    kind = parts[0]
    tower = model.tower
    if kind == "backbone":
        return [pr for g in BACKBONE_GROUPS for pr in _group_tensors(model, g)]
    if kind == "embeddings":
        mods: list[nn.Module | None] = [model.embedding, model.linear, model.dense_linear]
        return [(p, None) for m in mods if m is not None for p in m.parameters()]
    if kind == "interaction":
        return [(p, None) for p in model.interaction.parameters()]
    if kind == "tower":
        shared = [*tower.linears.parameters(), *tower.acts.parameters()]
        if tower.norms is not None:
            shared += list(tower.norms.parameters())
        return [(p, None) for p in shared]
    if kind == "head":
        return [(p, None) for p in model.head.parameters()]
    if kind in ("experts", "expert"):
        if tower.banks is None:
            raise ValueError(f"group {group!r}: this {model.config.method} model has no experts")
        row = int(parts[1]) if kind == "expert" else None
        return [(p, row) for p in tower.banks.parameters()]
    if kind in ("gate", "gate_row"):
        if model.gate is None:
            raise ValueError(f"group {group!r}: this model has no gate")
        if kind == "gate":
            return [(p, None) for p in model.gate.parameters()]
        return [(cast(nn.Parameter, model.gate.embedding.weight), int(parts[1]))]
    if kind == "lora":
        sets = tower.lora_sets
        if len(parts) < 2 or parts[1] not in sets:
            raise ValueError(f"group {group!r}: LoRA sets are {list(sets)}")
        row = int(parts[2]) if len(parts) > 2 else None
        return [(p, row) for p in sets[parts[1]].parameters()]
    if kind == "norms":
        norms = tower.domain_norms
        if len(parts) == 1:
            return [(p, None) for p in norms.parameters()]
        name = ":".join(parts[1:3]) if parts[1] == "div" else parts[1]
        if name not in norms:
            raise ValueError(f"group {group!r}: norm sets are {list(norms)}")
        rest = parts[3:] if parts[1] == "div" else parts[2:]
        row = int(rest[0]) if rest else None
        return [(p, row) for p in norms[name].parameters()]
    if kind == "rows":
        from mdlora.models.rows import grown_regions

        bits = group.split(":", 2)
        region = grown_regions(model).get((bits[1], bits[2])) if len(bits) == 3 else None
        if region is None:
            raise ValueError(f"group {group!r}: no grown rows (rows:<division>:<domain>)")
        start, n = region
        tables = [model.embedding] + ([model.linear] if model.linear is not None else [])
        return [(t.weight, r) for t in tables for r in range(start, start + n)]
    if kind == "fusion":
        if tower.fusions is None:
            raise ValueError("group 'fusion': this model has no fusion layers")
        return [(p, None) for p in tower.fusions.parameters()]
    raise ValueError(f"unknown parameter group {group!r}")


def set_trainable(model: MultiDomainModel, groups: Iterable[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze exactly ``groups``; returns the parameters to optimise."""
    for handle in getattr(model, "_row_hooks", []):
        handle.remove()
    model._row_hooks = []
    for p in model.parameters():
        p.requires_grad_(False)
    whole: set[int] = set()
    rows: dict[int, tuple[nn.Parameter, set[int]]] = {}
    for group in groups:
        for p, row in _group_tensors(model, group):
            if row is None:
                whole.add(id(p))
            else:
                if not 0 <= row < p.shape[0]:
                    raise ValueError(f"group {group!r}: row {row} out of range [0, {p.shape[0]})")
                rows.setdefault(id(p), (p, set()))[1].add(row)
    chosen: list[nn.Parameter] = []
    for p in model.parameters():
        if id(p) in whole:
            p.requires_grad_(True)
            chosen.append(p)
        elif id(p) in rows:
            p.requires_grad_(True)
            chosen.append(p)
            mask = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
            mask[sorted(rows[id(p)][1])] = 1
            mask = mask.view(-1, *([1] * (p.dim() - 1)))
            model._row_hooks.append(p.register_hook(_masker(mask)))
            p._mdlora_rows = mask  # type: ignore[attr-defined]
    for p in model.parameters():
        if id(p) not in rows and hasattr(p, "_mdlora_rows"):
            del p._mdlora_rows
    return chosen


def _masker(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """A ``register_hook`` closure that zeroes the gradient outside ``mask``'s rows."""
    return lambda grad: grad * mask


def trainable_parameter_count(model: MultiDomainModel) -> int:
    """Number of scalars the current freezing lets train (row groups count their rows only)."""
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        mask = getattr(p, "_mdlora_rows", None)
        if mask is None:
            total += p.numel()
        else:
            total += int(mask.sum().item()) * (p.numel() // p.shape[0])
    return total


def phase_groups(model: MultiDomainModel) -> dict[str, list[str]]:
    """The groups each training phase of the model's method unfreezes.

    Per-expert and per-division phases are listed once per expert / division.
    """
    return model.method.phase_groups(model)


def phase_parameter_counts(model: MultiDomainModel) -> dict[str, int]:
    """Trainable-parameter count of every phase (restores all-trainable afterwards)."""
    counts = {}
    for phase, groups in phase_groups(model).items():
        set_trainable(model, groups)
        counts[phase] = trainable_parameter_count(model)
    set_trainable(model, ["backbone", *_all_adapter_groups(model)])
    return counts


def _all_adapter_groups(model: MultiDomainModel) -> list[str]:
    groups = []
    if model.tower.banks is not None:
        groups.append("experts")
    if model.gate is not None:
        groups.append("gate")
    groups += [f"lora:{n}" for n in model.tower.lora_sets]
    if len(model.tower.domain_norms):
        groups.append("norms")
    if model.tower.fusions is not None:
        groups.append("fusion")
    return groups
