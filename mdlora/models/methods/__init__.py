"""One room per method: what MLoRA, MoE-MLoRA and MultiLoRA add to a backbone, in one file each.

A :class:`~models.methods.base.Method` says everything the rest of the code needs to know about
a method: its stages, which divisions have per-domain adapters, what it attaches to the model
and how a domain grows, its training phases' parameter groups, a domain's tensors by name (the
adapter package format) and how they are installed, and the phases that train one new domain.
Nothing outside this package tests a method's name; it asks ``method_of(config)``.

======================  ==========================================================  =========
method                  per-domain parts                                            file
======================  ==========================================================  =========
base (Mix)              none                                                        base.py
mlora                   one low-rank adapter per domain per tower layer             mlora.py
moe (MoE-MLoRA)         k experts per domain, mixed by a softmax gate               moe.py
multilora               a LoRA set per division, domain norms, attention fusion     multilora.py
======================  ==========================================================  =========
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mdlora.models.methods.base import Base, DomainPhase, Method
from mdlora.models.methods.mlora import MLoRA
from mdlora.models.methods.moe import MoE
from mdlora.models.methods.multilora import MultiLoRA

if TYPE_CHECKING:
    from mdlora.models.model import ModelConfig

__all__ = ["REGISTRY", "DomainPhase", "Method", "method_of"]

#: every method by name
REGISTRY: dict[str, Method] = {m.name: m for m in (Base(), MLoRA(), MoE(), MultiLoRA())}


def method_of(config: ModelConfig | str) -> Method:
    """The :class:`Method` of a model config (or of a method name)."""
    name = config if isinstance(config, str) else config.method
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"method must be one of {tuple(REGISTRY)}, got {name!r}") from None
