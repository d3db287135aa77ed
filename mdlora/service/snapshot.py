"""Immutable model snapshots: what one request is scored with, from start to finish.

A :class:`Snapshot` is the backbone, the adapter banks with one version of every domain, the
feature encoder and the metadata the answer reports. Registering, rolling back or removing an
adapter never touches a snapshot that is serving: it builds a NEW one off the request path and
swaps one reference (:class:`SnapshotHolder`); requests in flight finish on the snapshot they
started with.

Copy-on-write: :func:`cow_copy` copies the model's module structure and only the per-domain
tensors (banks, MoE gate, MultiLoRA LoRA sets and domain norms); embeddings, interaction,
tower, head and fusion weights are shared by every snapshot of one artifact (nothing mutates
them at inference).

Backbone alone: for an unknown domain under ``MDLORA_UNKNOWN_DOMAIN=backbone`` the request is
scored without any adapter. MLoRA and MoE-MLoRA serving models get one reserved extra domain
whose adapter is exactly zero (``B = 0``, ``c = 0``), so such rows ride in the same model call as
the others; MultiLoRA (whose fusion and cell norms have no neutral element) scores them with a
second model in stage ``backbone`` that shares every tensor.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mdlora.formats.adapter_package import (
    AdapterPackage,
    apply_adapter,
    make_adapter_package,
)
from mdlora.formats.artifact import (
    Artifact,
    load_artifact,
)
from mdlora.formats.encoder import FeatureEncoder
from mdlora.formats.files import (
    BACKBONE_WEIGHTS,
    GATE_WEIGHTS,
    GROWN_VOCAB,
)
from mdlora.formats.grown import GrownLookup, GrownValues, check_values
from mdlora.formats.grown import count as grown_count
from mdlora.models.model import MultiDomainModel
from mdlora.models.rows import grown_regions
from mdlora.models.state import copy_on_write

if TYPE_CHECKING:  # runtime imports this module
    from mdlora.service.runtime import Runner

#: the reserved primary-division domain of the zero adapter (``\x00`` can never be a real name:
#: adapter packages with it cannot be written to a path, and the API refuses it)
BACKBONE_DOMAIN = "\x00backbone"

DomainKey = tuple[str, str]


@dataclass(frozen=True)
class LoadedAdapter:
    """Which version of one domain's adapter a snapshot holds, and where it came from."""

    version: int
    sha256: str
    origin: str  # "artifact" (trained with the model) or "registry" (registered later)


@dataclass(frozen=True)
class Canary:
    """A canary version of one domain served beside its active version (service.rollout):
    an extra internal domain ``domain_id`` of the serving model takes ``percent`` of the
    domain's users (by a hash of the user id and ``salt``)."""

    loaded: LoadedAdapter
    domain_id: int
    percent: float
    salt: str
    rollout_id: str


#: the copy-on-write model copy every snapshot is built on (the core owns its state)
cow_copy = copy_on_write


def adapted_divisions(model: MultiDomainModel) -> list[str]:
    """Divisions whose domains have their own adapter in this model."""
    n = model.method.adapted
    return [d.name for d in model.config.divisions[:n]]


@dataclass(frozen=True)
class ArtifactInfo:
    """What identifies the loaded artifact (shown in answers and ``GET /v1/models``)."""

    path: Path
    model_id: str  # content hash of the backbone: the namespace of registry keys
    model_version: str  # human-facing "<dir name>@<hash>"
    manifest: Mapping[str, Any]

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> ArtifactInfo:
        files = artifact.manifest.get("files", {})
        digest = files.get(BACKBONE_WEIGHTS, {}).get("sha256") or str(
            artifact.manifest.get("model_signature", "unknown")
        )
        gate = files.get(GATE_WEIGHTS, {}).get("sha256", "")
        model_id = (digest[:16] + gate[:8]) if gate else digest[:16]
        path = Path(artifact.path or ".")
        return cls(path, model_id, f"{path.name}@{model_id[:12]}", artifact.manifest)


class ArtifactBase:
    """The artifact as loaded: the pristine model every rebuild starts from, and its encoder.

    Never served directly and never mutated: snapshots are copy-on-write copies of it.
    """

    def __init__(
        self, artifact: Artifact, device: torch.device | str = "cpu", max_rank: int | None = None
    ) -> None:
        if artifact.encoder is None:
            raise ValueError(
                f"{artifact.path}: the artifact has no encoder.json; the service needs the feature "
                "encoder the model was trained with (save_artifact(..., encoder=enc.to_dict()))"
            )
        self.info = ArtifactInfo.from_artifact(artifact)
        backbone_file = artifact.manifest.get("files", {}).get(BACKBONE_WEIGHTS, {})
        self.backbone_sha256: str | None = backbone_file.get("sha256")
        self.model = artifact.model.to(device).eval()
        self.device = torch.device(device)
        self.encoder = FeatureEncoder.from_dict(artifact.encoder)
        self.max_rank = max_rank
        files = {
            e["division"] + "/" + e["domain"]: e["sha256"] for e in artifact.manifest["adapters"]
        }
        self.adapters: dict[DomainKey, LoadedAdapter] = {
            key: LoadedAdapter(v, files.get("/".join(key), ""), "artifact")
            for key, v in artifact.adapter_versions.items()
        }
        self._packages: dict[DomainKey, AdapterPackage] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, directory: Path | str, device: torch.device | str = "cpu", max_rank: int | None = None
    ) -> ArtifactBase:
        return cls(load_artifact(directory, map_location=device), device, max_rank)

    def artifact_package(self, division: str, domain: str) -> AdapterPackage:
        """The adapter ``division/domain`` was trained with (taken from the pristine model)."""
        key = (division, domain)
        if key not in self.adapters:
            raise KeyError(f"{division}/{domain} is not a domain of the artifact")
        with self._lock:
            if key not in self._packages:
                values = self.encoder.grown.get(division, {}).get(domain)
                pkg = make_adapter_package(
                    self.model, division, domain, self.adapters[key].version, self.backbone_sha256,
                    **({GROWN_VOCAB: values} if values else {}),
                )
                pkg.tensors = {k: v.cpu() for k, v in pkg.tensors.items()}
                self._packages[key] = pkg
            return self._packages[key]

    def snapshot(self, registry_version: int = 0) -> Snapshot:
        """The artifact exactly as trained (every domain at its artifact version)."""
        grown = {
            (div, dom): values
            for div, doms in self.encoder.grown.items()
            for dom, values in doms.items()
        }
        return Snapshot(self, cow_copy(self.model), dict(self.adapters), registry_version, grown)


class Snapshot:
    """One immutable serving state (see the module docstring). Build new ones, never mutate.

    Attributes:
        model: the adapter-complete model (no reserved domain), the base of the next snapshot.
        serving_model: what scores requests (``model`` plus the zero "backbone" domain for
            MLoRA / MoE-MLoRA).
        backbone_model: MultiLoRA only: the same tensors in stage ``backbone``.
        domain_ids: division -> domain name -> id in ``serving_model``.
        adapters: (division, domain) -> the adapter version loaded.
    """

    def __init__(
        self,
        base: ArtifactBase,
        model: MultiDomainModel,
        adapters: dict[DomainKey, LoadedAdapter],
        registry_version: int,
        grown: Mapping[DomainKey, GrownValues] | None = None,
    ) -> None:
        self.base = base
        self.model = model
        self.adapters: Mapping[DomainKey, LoadedAdapter] = dict(adapters)
        #: ids added domains brought (``mdlora.formats.grown``) and their lookups into
        #: ``model``'s rows
        self.grown: Mapping[DomainKey, GrownValues] = dict(grown or {})
        regions = grown_regions(model)
        self.grown_lookups: dict[DomainKey, GrownLookup] = {}
        for key, values in self.grown.items():
            region = regions.get(key)
            if region is None or region[1] != grown_count(values):
                raise ValueError(f"{key[0]}/{key[1]}: grown ids and rows disagree")
            self.grown_lookups[key] = GrownLookup(base.encoder, values, region[0])
        self.registry_version = registry_version
        self.created_at = time.time()
        self.method = model.config.method
        self.divisions = [d.name for d in model.config.divisions]
        self.adapted = adapted_divisions(model)
        self.domain_ids = {
            d.name: {name: i for i, name in enumerate(d.domains)} for d in model.config.divisions
        }
        self.backbone_id: int | None = None
        self.backbone_model: MultiDomainModel | None = None
        self.serving_model = model
        if model.method.neutral_new_domain:
            self.serving_model = cow_copy(model)
            primary = self.divisions[0]
            self.backbone_id = self.serving_model.add_domain(primary, BACKBONE_DOMAIN, "own")
        elif model.method.adapted:  # no neutral adapter: the same tensors, stage backbone
            self.backbone_model = copy.copy(model)
            self.backbone_model.set_stage("backbone")
        #: canary versions served beside the active ones (set by service.rollout.attach)
        self.canaries: Mapping[DomainKey, Canary] = {}
        #: what scores its rows: set by the runtime (service.runtime) before the snapshot serves
        self.runner: Runner | None = None

    @property
    def info(self) -> ArtifactInfo:
        return self.base.info

    @property
    def encoder(self) -> FeatureEncoder:
        return self.base.encoder

    def domains(self, division: str) -> list[str]:
        """Domain names of ``division`` in this snapshot (the reserved one excluded)."""
        return list(self.domain_ids[division])

    def with_adapters(
        self, packages: list[tuple[AdapterPackage, LoadedAdapter]], registry_version: int
    ) -> Snapshot:
        """A new snapshot with ``packages`` installed on a copy of this one's model.

        Every package is validated against the model before anything is installed in the copy
        (``mdlora.formats.adapter_package.apply_adapter``); on error this snapshot is untouched
        and the copy is dropped, so nothing is ever half-applied.
        """
        model = cow_copy(self.model)
        adapters = dict(self.adapters)
        grown = dict(self.grown)
        device = model.device
        for pkg, loaded in packages:
            # packages are parsed on the CPU; the rows they fill may live on a GPU
            on_device = AdapterPackage(
                pkg.config, {k: v.to(device) for k, v in pkg.tensors.items()}
            )
            apply_adapter(model, on_device, self.base.max_rank)
            key = (pkg.division, pkg.domain)
            adapters[key] = loaded
            grown.pop(key, None)
            values = pkg.config.get(GROWN_VOCAB)
            if values:
                grown[key] = check_values(self.base.encoder, values, f"{key[0]}/{key[1]}")
        model.eval()
        return Snapshot(self.base, model, adapters, registry_version, grown)

    def with_registry_version(self, registry_version: int) -> Snapshot:
        """The same model, labelled with a newer registry version (no adapter changed)."""
        clone = copy.copy(self)
        clone.registry_version = registry_version
        return clone

    def gate_sharers(self, key: DomainKey) -> list[str]:
        """The other domains whose MoE gates mix ``key``'s experts, so that a new version of
        them changes their scores too (none without a gate, or for a domain not served)."""
        gate, ids = self.model.gate, self.domain_ids.get(key[0], {})
        if gate is None or key[1] not in ids or key[0] != self.divisions[0]:
            return []
        names = {i: n for n, i in ids.items()}
        return [names[d] for d in gate.sharers(ids[key[1]]) if d in names]

    def describe(self) -> dict[str, Any]:
        """JSON description for ``GET /v1/models``."""
        cfg = self.model.config
        return {
            "model_version": self.info.model_version,
            "model_id": self.info.model_id,
            "artifact_dir": str(self.info.path),
            "method": cfg.method,
            "backbone": cfg.backbone,
            "stage": self.model.stage.name,
            "tower": list(cfg.tower),
            "ranks": cfg.lora_ranks() if self.model.method.adapted else [],
            "divisions": [
                {"name": d, "adapted": d in self.adapted, "domains": self.domains(d)}
                for d in self.divisions
            ],
            "adapters": [
                {
                    "division": k[0],
                    "domain": k[1],
                    "version": v.version,
                    "origin": v.origin,
                    "sha256": v.sha256,
                }
                for k, v in sorted(self.adapters.items())
            ],
            "registry_version": self.registry_version,
            "created_at": self.created_at,
            "age_seconds": time.time() - self.created_at,
            "features": self.model.config.features.to_dict(),
        }


@dataclass
class SnapshotHolder:
    """The one reference requests read; swapped atomically under a lock by the control plane."""

    current: Snapshot
    swaps: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def swap(self, snapshot: Snapshot) -> Snapshot:
        with self._lock:
            old, self.current = self.current, snapshot
            self.swaps += 1
            return old
