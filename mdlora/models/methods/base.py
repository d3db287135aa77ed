"""The method interface, and Base (Mix): one backbone for every domain, nothing per domain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from mdlora.models.model import ModelConfig, MultiDomainModel

#: a per-domain tensor's place: the stacked tensor and the row(s) of the domain
Slot = tuple[Tensor, int | list[int]]


@dataclass
class DomainPhase:
    """One phase that trains a single new domain's own parameters (``mdlora add-domain``)."""

    name: str
    stage: str
    groups: list[str]
    expert: int | None = None
    division: str | None = None
    metric_column: int = 0


class Method:
    """What a method adds to the backbone (see the package docstring). Base is the identity."""

    name = "base"
    label = "Base"
    stages: tuple[str, ...] = ("backbone",)
    final_stage = "backbone"
    #: the leading divisions whose domains have their own adapters
    adapted = 0
    #: a domain added to the model starts with an adapter that changes nothing (so a
    #: reserved extra domain scores exactly like the backbone, in the same model call)
    neutral_new_domain = False
    #: a domain's adapter copied to another domain id scores exactly alike (what a canary,
    #: served as an internal copy of its domain, needs)
    exact_domain_copy = False
    #: ``experts_per_domain`` applies (a run with k experts is another model than with 1)
    has_experts = False

    def check(self, config: ModelConfig) -> None:
        """Raise ``ValueError`` when ``config`` cannot build this method."""

    def experts(self, config: ModelConfig) -> int:
        """Adapter rows ("experts") per domain of the primary division."""
        return 1

    def attach(self, model: MultiDomainModel) -> None:
        """Build the method's per-domain parts on a freshly built backbone."""

    def grow(self, model: MultiDomainModel, div_i: int, gate_scope: str) -> None:
        """Make room for one more domain of division ``div_i`` (its parts start neutral)."""

    def phase_groups(self, model: MultiDomainModel) -> dict[str, list[str]]:
        """The parameter groups each training phase unfreezes (``mdlora.models.freeze``)."""
        return {"backbone": ["backbone"]}

    def adapter_rows(self, model: MultiDomainModel, d: int) -> list[int]:
        """The bank rows domain ``d`` of the primary division owns."""
        return [d]

    def slots(self, model: MultiDomainModel, division: str, d: int) -> dict[str, Slot]:
        """Where each of domain ``d``'s tensors lives: name -> (stacked tensor, its index).

        The one naming of a domain's tensors: saving reads ``tensor[index]`` and loading
        writes it (``mdlora.models.state``), so the two can never disagree.
        """
        raise ValueError(f"a {self.name} model has no per-domain adapters")

    def domain_phases(
        self, model: MultiDomainModel, division: str, d: int, final_stage: str, gate_scope: str
    ) -> list[DomainPhase]:
        """The phases that train new domain ``d``'s own parameters and nothing else."""
        raise ValueError(
            f"a {self.name!r} model has no per-domain adapters: add-domain needs an mlora, moe "
            "or multilora artifact"
        )


class Base(Method):
    """Base / Mix: the backbone alone (the domain may still be one of its features)."""
