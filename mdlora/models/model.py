"""The multi-domain CTR model: one backbone, and the adapters of one method.

``MultiDomainModel(config)`` builds embeddings -> interaction -> adapted tower -> head for
``config.backbone`` and attaches what ``config.method`` needs:

* ``base``: nothing (Base / Mix, Single, Fine-tune baselines);
* ``mlora``: one adapter per domain of the primary division;
* ``moe``: ``experts_per_domain`` experts per domain and a :class:`DomainGate`;
* ``multilora``: a LoRA set with row scale under the natural and the auxiliary division, a
  domain norm per division and per cell, and the fusion attention.

Which of them a forward pass uses is the model's :class:`Stage` (the training phases switch
it; an exported model keeps its final stage). A mixed-domain batch is always one call.
"""

from __future__ import annotations

import difflib
import numbers
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mdlora.models.backbones import BACKBONES, build_interaction
from mdlora.models.features import EncodedBatch, FeatureSpec, FieldEmbedding
from mdlora.models.fusion import FUSION_MODES
from mdlora.models.gate import DomainGate
from mdlora.models.lora import (
    ROUTING_STRATEGIES,
    InferenceBank,
    fold_experts,
    merge_limit,
    rank_from_alpha,
)
from mdlora.models.methods import REGISTRY, Method, method_of
from mdlora.models.tower import ACTIVATIONS, AdaptedTower, Route

METHODS = tuple(REGISTRY)


@dataclass(frozen=True)
class Division:
    """A domain division: a name and its domain names (domain id = position)."""

    name: str
    domains: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError(f"division {self.name!r} has no domains")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"division {self.name!r} has duplicate domain names")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved in the artifact's manifest."""

    features: FeatureSpec
    divisions: tuple[Division, ...]
    backbone: str = "deepfm"  # mlp, wdl, deepfm, nfm, autoint, pnn, dcn, fibinet, xdeepfm
    embed_dim: int = 8
    tower: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5  # on each tower layer's base output
    activation: str = "relu"
    tower_norm: str = "none"  # "none" or "batch" (shared batch norm in the tower)
    backbone_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"cross_layers": 2}
    method: str = "base"  # base, mlora, moe, multilora
    # MLoRA rank temperature: ranks max(floor(out / alpha), 1). A method with adapters needs
    # alpha or ranks; the core has no dataset's default (training resolves it per data setting)
    alpha: float | None = None
    ranks: tuple[int, ...] | None = None  # explicit per-layer ranks (override alpha)
    experts_per_domain: int = 1  # MoE-MLoRA: k experts per domain
    gate_dim: int = 4  # MoE-MLoRA: domain embedding size of the gate
    fusion: str = "attention"  # MultiLoRA: attention, add or avg
    fusion_rank: int = 8  # MultiLoRA: r of W_Q, W_K

    def __post_init__(self) -> None:
        method = method_of(self.method)  # a clear ValueError for an unknown method
        if not self.divisions:
            raise ValueError("a model needs at least one division")
        self.backbone = str(self.backbone).lower()  # "DeepFM" is deepfm
        self.tower = tuple(self.tower) if isinstance(self.tower, list | tuple) else self.tower
        if isinstance(self.ranks, list):
            self.ranks = tuple(self.ranks)
        check_settings(self)
        method.check(self)
        if method.adapted and self.ranks is None and self.alpha is None:
            raise ValueError(f"method {self.method!r} needs adapter ranks: set ranks or alpha")

    def lora_ranks(self) -> list[int]:
        if self.ranks is not None:
            if len(self.ranks) != len(self.tower):
                raise ValueError(f"ranks {self.ranks} must have one entry per layer {self.tower}")
            return list(self.ranks)
        if self.alpha is None:  # a method without adapters (__post_init__ refuses the others)
            return []
        return [rank_from_alpha(o, self.alpha) for o in self.tower]

    def division(self, name: str) -> Division:
        for d in self.divisions:
            if d.name == name:
                return d
        raise KeyError(f"unknown division {name!r}; known: {[d.name for d in self.divisions]}")

    def division_index(self, name: str) -> int:
        return [d.name for d in self.divisions].index(self.division(name).name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = self.features.to_dict()
        d["divisions"] = [{"name": v.name, "domains": list(v.domains)} for v in self.divisions]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["features"] = FeatureSpec.from_dict(d["features"])
        d["divisions"] = tuple(Division(v["name"], tuple(v["domains"])) for v in d["divisions"])
        d["tower"] = tuple(d["tower"])
        if d.get("ranks") is not None:
            d["ranks"] = tuple(d["ranks"])
        return cls(**d)


#: the settings a user chooses: every field but the data-derived features and divisions and
#: the method (training derives it from its recipe); a training config's ``model:`` block
SETTINGS = tuple(f.name for f in fields(ModelConfig) if f.name not in
                 ("features", "divisions", "method"))  # fmt: skip


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_settings(config: ModelConfig) -> None:
    """Raise ``ValueError`` naming the first setting of ``config`` out of range.

    The one place model settings are checked: a training config's ``model:`` block is
    validated by building a :class:`ModelConfig` from it, an artifact's manifest on loading.
    """
    c = config
    if c.backbone not in BACKBONES:
        hint = difflib.get_close_matches(c.backbone, list(BACKBONES), n=1)
        raise ValueError(
            f"unknown backbone {c.backbone!r}; choose from {sorted(BACKBONES)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    for name in ("embed_dim", "experts_per_domain", "gate_dim", "fusion_rank"):
        if not _positive_int(getattr(c, name)):
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(c, name)!r}")
    for name in ("tower", "ranks"):
        v = getattr(c, name)
        if (v is not None or name == "tower") and not (
            isinstance(v, tuple) and v and all(_positive_int(n) for n in v)
        ):
            raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {v!r}")
    if not _real(c.dropout) or not 0 <= c.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout!r}")
    if c.alpha is not None and (not _real(c.alpha) or not c.alpha > 0):
        raise ValueError(f"alpha must be > 0, got {c.alpha!r}")
    if c.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {c.activation!r}")
    if c.tower_norm not in ("none", "batch"):
        raise ValueError(f"tower_norm must be 'none' or 'batch', got {c.tower_norm!r}")
    if c.fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {FUSION_MODES}, got {c.fusion!r}")
    if not isinstance(c.backbone_options, dict):
        raise ValueError(f"backbone_options must be a mapping, got {c.backbone_options!r}")


@dataclass(frozen=True)
class Stage:
    """Which parts a forward pass uses: ``name`` plus the expert or division it is about."""

    name: str
    expert: int | None = None  # MoE "expert" stage: the one active expert
    division: str | None = None  # MultiLoRA "lora" stage: the division whose set is used


class MultiDomainModel(nn.Module):
    # Gradient hooks of row-group freezing; set (and replaced) by
    # ``mdlora.models.freeze.set_trainable``, absent until it first runs.
    _row_hooks: list[RemovableHandle]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        spec = config.features
        self.embedding = FieldEmbedding(spec, config.embed_dim)
        self.interaction = build_interaction(
            config.backbone, spec.num_embedded, config.embed_dim, len(spec.dense),
            dict(config.backbone_options),
        )  # fmt: skip
        self.tower = AdaptedTower(
            self.interaction.tower_in, config.tower, config.dropout, config.activation,
            config.tower_norm,
        )  # fmt: skip
        self.head = nn.Linear(self.tower.out_dim + self.interaction.side_dim, 1)
        self.linear: FieldEmbedding | None = None
        self.dense_linear: nn.Linear | None = None
        if self.interaction.uses_linear:
            self.linear = FieldEmbedding(spec, 1)
            if spec.dense:
                self.dense_linear = nn.Linear(len(spec.dense), 1, bias=False)
        self.gate: DomainGate | None = None
        self.method: Method = method_of(config)
        self.method.attach(self)
        self.stage = Stage(self.method.final_stage)
        self.routing: list[str] = self.default_routing()
        self._inference_cache: tuple[tuple[Any, ...], list[InferenceBank]] | None = None
        #: embedding rows grown for domains added later: (division, domain) -> row count, in
        #: table order (``mdlora.models.rows``); never mutated, always replaced
        self.grown: dict[tuple[str, str], int] = {}

    # ----------------------------------------------------------------- stages and routing
    def set_stage(self, name: str, expert: int | None = None, division: str | None = None) -> None:
        """Switch what the forward pass uses (``self.method.stages`` lists them)."""
        allowed = self.method.stages
        if name not in allowed:
            raise ValueError(f"method {self.config.method!r} has stages {allowed}, not {name!r}")
        if name == "expert":
            assert self.tower.banks is not None
            n = self.tower.primary_banks()[0].num_experts
            if expert is None or not 0 <= expert < n:
                raise ValueError(f"stage 'expert' needs expert in [0, {n}), got {expert}")
        if name == "lora":
            self.config.division(division or "")
        self.stage = Stage(name, expert, division)

    def default_routing(self) -> list[str]:
        """Per-layer routing chosen from measurements (benchmarks/bench_routing.py): ``merged``.

        A batch of one domain (one ``/predict`` request) runs each layer as that domain's
        merged ``W + A_d B_d`` (the bare backbone's cost); where the folded adapters are
        nearly full rank (MoE-MLoRA mixing many experts), batches of up to 32 domains run as
        one GEMM per domain; anything else takes the fused kernel (CPU with numba; else
        embedding_bag). Measured at 21 domains on one core, MoE-MLoRA went from 2.3-3.8x the
        backbone (GEMM mixture / kernel) to 1.7-1.9x this way.
        """
        return ["merged"] * len(self.config.tower)

    def train(self, mode: bool = True) -> MultiDomainModel:
        """Also drops the inference-bank cache: optimisers that write parameters without
        bumping their version counter (fused Adam) would otherwise leave it stale. Only a
        model that was or will be training drops it: ``eval()`` on an eval model keeps it."""
        if mode or self.training:
            self._inference_cache = None
        return super().train(mode)

    def set_routing(self, strategies: str | list[str]) -> None:
        """Choose how each tower layer routes a mixed batch at inference.

        ``strategies``: one of ``bag``/``fused_down``/``gather`` for every layer, or one per layer.
        """
        if isinstance(strategies, str):
            strategies = [strategies] * len(self.config.tower)
        for s in strategies:
            if s not in ROUTING_STRATEGIES:
                raise ValueError(
                    f"unknown routing strategy {s!r}; choose from {ROUTING_STRATEGIES}"
                )
        self.routing = list(strategies)
        self._inference_cache = None

    def _route(self, domains: Tensor) -> Route | None:
        stage, cfg = self.stage.name, self.config
        if stage == "backbone":
            return None
        primary = domains[:, 0]
        if stage == "adapters":
            if self.training:
                return Route(index=primary)
            return Route(index=primary, banks=self.inference_banks())
        if stage == "expert":
            return Route(index=torch.full_like(primary, self.stage.expert or 0))
        if stage == "gate":
            assert self.gate is not None
            if self.training:
                return Route(weights=self.gate(primary))
            return Route(index=primary, banks=self.inference_banks())
        nat, aux = cfg.divisions[0].name, cfg.divisions[1].name
        if stage == "lora":
            div = self.stage.division or nat
            idx = domains[:, cfg.division_index(div)]
            return Route(lora={div: idx}, norm=(f"div:{div}", idx))
        n_aux = len(cfg.divisions[1].domains)
        cell = primary * n_aux + domains[:, 1]
        return Route(lora={nat: primary, aux: domains[:, 1]}, norm=("cell", cell), fuse=True)

    def _bank_tensors(self) -> list[Tensor]:
        """What the inference banks are built from: adapters, gate, and the tower's linear
        layers (the ``merged`` per-domain layers include them)."""
        tensors: list[Tensor] = []
        if self.tower.banks is not None:
            tensors += list(self.tower.banks.parameters())
            tensors += list(self.tower.linears.parameters())
        if self.gate is not None:
            tensors += [*self.gate.parameters(), *self.gate.buffers()]
        return tensors

    @torch.no_grad()
    def inference_banks(self) -> list[InferenceBank]:
        """Per-layer banks routed by ``self.routing`` (MoE gate folded in, or kept as a table).

        Cached until any adapter or gate tensor changes (tracked by tensor versions).
        """
        key: tuple[Any, ...] = tuple(
            (t.data_ptr(), -1 if t.is_inference() else t._version, tuple(t.shape))
            for t in self._bank_tensors()
        )  # inference tensors have no version counter; they are not edited in place here
        key = (*key, tuple(self.routing))
        if self._inference_cache is not None and self._inference_cache[0] == key:
            return self._inference_cache[1]
        banks = self._build_banks(self.routing)
        self._inference_cache = (key, banks)
        return banks

    @torch.no_grad()
    def folded_banks(self, strategy: str = "gather") -> list[InferenceBank]:
        """One effective adapter per domain and layer (``[D, in, R]`` ...), whatever the routing.

        This is the layout the ONNX graph takes as inputs.
        """
        if strategy == "mixture":
            raise ValueError("folded banks cannot use the mixture strategy")
        return self._build_banks([strategy] * len(self.config.tower), merge=False)

    def _build_banks(self, strategies: list[str], merge: bool = True) -> list[InferenceBank]:
        assert self.tower.banks is not None
        banks: list[InferenceBank] = []
        if self.gate is not None:
            gate, usable = self.gate.table()
        for bank, strategy in zip(self.tower.primary_banks(), strategies, strict=True):
            lin = cast(nn.Linear, self.tower.linears[len(banks)])
            if self.gate is not None:
                a, b, c = fold_experts(bank.A, bank.scaled_b(), bank.bias, gate, usable)
            else:
                a, b, c = bank.A.detach(), bank.scaled_b().detach(), bank.bias.detach()
            folded = InferenceBank(a.contiguous(), b.contiguous(), c.contiguous(), "bag")
            if strategy == "mixture":
                table = gate if self.gate is not None else torch.eye(bank.num_experts)
                ea, eb, ec = bank.A.detach(), bank.scaled_b().detach(), bank.bias.detach()
                built = InferenceBank(ea, eb, ec, strategy, gate=table.to(ea).contiguous())
            else:
                built = InferenceBank(folded.a, folded.b, folded.c, strategy)
            if merge and strategy != "gather":
                # every inference bank scores a single-domain batch (one /predict request)
                # with its domain's merged layer; ``merged`` also takes a few domains at once
                limit = merge_limit(folded) if strategy == "merged" else 1
                folded.merge(lin.weight.detach(), lin.bias.detach(), limit)
                built.merged_w, built.merged_b = folded.merged_w, folded.merged_b
                built.merge_limit = folded.merge_limit
            banks.append(built)
        return banks

    @torch.no_grad()
    def tune_routing(self, batch: EncodedBatch, repeats: int = 20) -> list[str]:
        """Time each routing strategy per layer on ``batch`` and keep the fastest.

        Strategies give the same scores up to float rounding, so this only changes speed.
        """
        if self.stage.name not in ("adapters", "gate"):
            return self.routing
        was_training = self.training
        self.eval()
        best: list[str] = []
        for layer in range(len(self.config.tower)):
            times = {}
            for s in ROUTING_STRATEGIES:
                trial = list(self.routing)
                trial[layer] = s
                self.set_routing(trial)
                self.score_batch(batch)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    self.score_batch(batch)
                times[s] = time.perf_counter() - t0
            best.append(min(times, key=times.__getitem__))
            self.set_routing(best + self.routing[layer + 1 :])
        self.set_routing(best)
        self.train(was_training)
        return best

    # ----------------------------------------------------------------------- forward
    def forward(
        self,
        sparse: Tensor,
        dense: Tensor,
        domains: Tensor,
        multi_hot: Tensor | None = None,
        banks: list[InferenceBank] | None = None,
    ) -> Tensor:
        """Logits ``[B]`` for one (possibly mixed-domain) batch.

        ``banks``: per-layer inference banks to route the primary division through instead
        of the model's own (the ONNX export passes its graph inputs here).
        """
        emb = self.embedding(sparse, multi_hot)
        tower_in, side, extra = self.interaction(emb, dense)
        route = self._route(domains) if banks is None else Route(index=domains[:, 0], banks=banks)
        h = self.tower(tower_in, route)
        if side is not None:
            h = torch.cat([side, h], 1)
        logit = self.head(h).squeeze(-1)
        if extra is not None:
            logit = logit + extra
        if self.linear is not None:
            logit = logit + self.linear(sparse, multi_hot).sum((1, 2))
            if self.dense_linear is not None:
                logit = logit + self.dense_linear(dense).squeeze(-1)
        return logit

    def score_batch(self, batch: EncodedBatch, check: bool = True) -> Tensor:
        """Click probabilities ``[B]`` for an :class:`EncodedBatch`.

        ``check``: refuse domain ids the divisions do not have (costs a device sync on CUDA;
        a caller whose ids come from this model's own domain table may skip it).
        """
        if check:
            self.check_domain_ids(batch.domains)
        return torch.sigmoid(self(batch.sparse, batch.dense, batch.domains, batch.multi_hot))

    def check_domain_ids(self, domains: Tensor) -> None:
        """Raise ValueError unless ``domains`` is ``[B, divisions]`` of ids each division has
        (an id past the end would index another domain's rows or padding, silently)."""
        divs = self.config.divisions
        if domains.dim() != 2 or domains.shape[1] != len(divs):
            raise ValueError(
                f"domains must be [batch, {len(divs)}] (one id per division "
                f"{[d.name for d in divs]}), got shape {tuple(domains.shape)}"
            )
        if domains.numel() == 0:
            return
        lows, highs = domains.amin(0).tolist(), domains.amax(0).tolist()
        for div, lo, hi in zip(divs, lows, highs, strict=True):
            n = len(div.domains)
            if lo < 0 or hi >= n:
                raise ValueError(
                    f"domain id {lo if lo < 0 else hi} is out of range for division "
                    f"{div.name!r}, which has {n} domains (ids 0..{n - 1})"
                )

    # ------------------------------------------------------------------------ growth
    @torch.no_grad()
    def add_domain(self, division: str, name: str, gate_scope: str = "all") -> int:
        """Add domain ``name`` to ``division`` without touching any existing weight.

        MLoRA: one more adapter (A random, B and c zero, so it starts as the backbone).
        MoE-MLoRA: ``experts_per_domain`` more experts and a gate row (see ``DomainGate.grow``).
        MultiLoRA: one more LoRA in that division's set, its domain norms and norm cells.
        Returns the new domain id.
        """
        cfg = self.config
        div_i = cfg.division_index(division)
        div = cfg.divisions[div_i]
        if name in div.domains:
            raise ValueError(f"domain {name!r} already exists in division {division!r}")
        new_id = len(div.domains)
        divisions = list(cfg.divisions)
        divisions[div_i] = Division(div.name, (*div.domains, name))
        self.method.grow(self, div_i, gate_scope)
        self.config = replace(cfg, divisions=tuple(divisions))
        self._inference_cache = None
        return new_id

    # ------------------------------------------------------------------------ helpers
    def domain_names(self, division: str | None = None) -> tuple[str, ...]:
        div = self.config.divisions[0] if division is None else self.config.division(division)
        return div.domains

    @property
    def device(self) -> torch.device:
        return self.head.weight.device
