"""MoE-MLoRA's gate: a softmax over experts computed from a small domain embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DomainGate(nn.Module):
    """``g = softmax(Linear(Embedding(d)) + mask[d])`` over the ``E`` experts.

    ``mask`` (a saved buffer of 0 / -inf) says which experts a domain may use. It is all zeros
    for the domains the model was trained with; a domain added later gets new experts that
    the existing domains cannot see, so their gates, and their scores, stay exactly as they were.
    ``owner[e]`` is the domain expert ``e`` was trained on.
    """

    mask: Tensor  # buffer [D, E]: 0 where domain d may use expert e, -inf elsewhere
    owner: Tensor  # buffer [E]: the domain each expert belongs to

    def __init__(self, num_domains: int, num_experts: int, dim: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_domains, dim)
        self.proj = nn.Linear(dim, num_experts)
        self.register_buffer("mask", torch.zeros(num_domains, num_experts))
        owner = torch.arange(num_experts) % num_domains
        self.register_buffer("owner", owner)

    @property
    def num_experts(self) -> int:
        return int(self.proj.out_features)

    @property
    def num_domains(self) -> int:
        return int(self.embedding.num_embeddings)

    def logits(self, domain: Tensor) -> Tensor:
        emb = self.embedding(domain)
        # An explicit product-sum rather than a GEMM: each logit's reduction then does not
        # depend on how many experts exist, which keeps growth bit-exact.
        return (emb.unsqueeze(1) * self.proj.weight).sum(-1) + self.proj.bias + self.mask[domain]

    def forward(self, domain: Tensor) -> Tensor:
        return torch.softmax(self.logits(domain), dim=-1)

    def table(self) -> tuple[Tensor, Tensor]:
        """Per-domain gate weights ``[D, E]`` and the usable-expert mask, for folding.

        The softmax runs over each domain's usable experts only, so a domain's weights do not
        change when experts it cannot see are added.
        """
        domains = torch.arange(self.num_domains, device=self.mask.device)
        logits = self.logits(domains)
        usable = torch.isfinite(self.mask)
        gate = torch.zeros_like(logits)
        for d in range(self.num_domains):
            sel = usable[d].nonzero().squeeze(1)
            gate[d, sel] = torch.softmax(logits[d, sel], dim=0)
        return gate, usable

    def sharers(self, domain: int) -> list[int]:
        """The other domains whose gate rows can weigh ``domain``'s experts: a new version of
        those experts changes their scores too."""
        owned = self.owner == domain
        usable = torch.isfinite(self.mask[:, owned]).any(dim=1)
        return [d for d in usable.nonzero().flatten().tolist() if d != domain]

    def scope(self, domain: int) -> str:
        """``"own"`` if ``domain``'s gate row sees only its own experts, else ``"all"``."""
        others = self.owner != domain
        return "own" if bool(torch.isinf(self.mask[domain, others]).all()) else "all"

    @torch.no_grad()
    def grow(self, new_experts: int, scope: str = "all") -> int:
        """Add one domain and ``new_experts`` experts it owns; returns the new domain's id.

        ``scope="all"``: the new domain's gate row sees every expert; ``"own"``: only its own
        (the row is then fixed to a mixture of its own experts).
        """
        if scope not in ("all", "own"):
            raise ValueError(f"scope must be 'all' or 'own', got {scope!r}")
        d_new, e_old = self.num_domains, self.num_experts
        dev = self.mask.device
        new_row = torch.randn(1, self.embedding.embedding_dim, device=dev)
        emb = torch.cat([self.embedding.weight, new_row], 0)
        self.embedding = nn.Embedding.from_pretrained(emb, freeze=False)
        w = torch.empty(new_experts, self.proj.in_features, device=dev)
        nn.init.kaiming_uniform_(w, a=5**0.5)
        proj = nn.Linear(self.proj.in_features, e_old + new_experts, device=dev)
        proj.weight.copy_(torch.cat([self.proj.weight, w], 0))
        proj.bias.copy_(torch.cat([self.proj.bias, torch.zeros(new_experts, device=dev)], 0))
        self.proj = proj
        inf = float("-inf")
        mask = torch.cat([self.mask, torch.full((d_new, new_experts), inf, device=dev)], 1)
        row = torch.zeros(1, e_old + new_experts, device=dev)
        if scope == "own":
            row[0, :e_old] = inf
        self.mask = torch.cat([mask, row], 0)
        self.owner = torch.cat([self.owner, torch.full((new_experts,), d_new, device=dev)])
        return d_new
