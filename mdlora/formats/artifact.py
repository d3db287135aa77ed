"""The artifact directory: the plain, pickle-free format training writes and serving loads.

::

    manifest.json                       schema version, model config, stage, tensor lists,
                                        adapter list with versions and checksums, metrics
    encoder.json                        the feature encoder (vocabularies), when given; its
                                        domain lists must be the manifest's (formats.domains)
    backbone.safetensors                the frozen backbone
    gate.safetensors                    MoE gate / MultiLoRA fusion and cell norms (if any)
    adapters/<division>/<domain>/<version>/adapter_config.json
                                       /adapter_model.safetensors

An adapter package (the last two files) is also what ``mdlora add-domain`` writes and what
the service's admin API accepts. Every load checks names, shapes, dtypes, finiteness and
SHA-256 checksums before a tensor reaches the model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mdlora.formats.adapter_package import (
    AdapterPackage,
    apply_adapter,
    backbone_bytes,
    make_adapter_package,
    read_adapter_package,
    write_adapter_package,
)
from mdlora.formats.domains import disagreement
from mdlora.formats.fileio import staging_dir
from mdlora.formats.files import (
    ADAPTER_WEIGHTS,
    BACKBONE_WEIGHTS,
    ENCODER,
    GATE_PREFIXES,
    GATE_WEIGHTS,
    GROWN_VOCAB,
    MANIFEST,
    REGISTRY,
    SCHEMA_VERSION,
    ArtifactError,
    describe_tensors,
    expected_tensors,
    load_safetensors_bytes,
    model_signature,
    sha256_bytes,
)
from mdlora.models.features import EncodedBatch
from mdlora.models.model import ModelConfig, MultiDomainModel
from mdlora.models.state import (
    TensorMismatchError,
    check_tensors,
    load_shared,
    shared_tensors,
)


@dataclass
class Artifact:
    model: MultiDomainModel
    manifest: dict[str, Any]
    encoder: dict[str, Any] | None = None
    path: Path | None = None
    adapter_versions: dict[tuple[str, str], int] = field(default_factory=dict)

    def score(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities for raw records (dicts of column -> value, the domain columns
        included), mixed domains in one model call, encoded as in training (unknown ids and
        missing features as the training encoder treats them; an unknown domain raises).

        ``art = load_artifact("runs/x/artifact"); art.score([{"user_id": 5, "movie_id": 3,
        "age": "25"}])``
        """
        from mdlora.formats.encoder import FeatureEncoder
        from mdlora.formats.grown import place

        if self.encoder is None:
            raise ArtifactError("the artifact has no encoder.json: encode the rows yourself")
        encoder = FeatureEncoder.from_dict(self.encoder)
        place(encoder, self.model)
        arrays = encoder.encode_records(records)
        batch = EncodedBatch.from_arrays(**arrays, device=self.model.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self.model.score_batch(batch).cpu().numpy()
        finally:
            self.model.train(was_training)

    def apply_adapter(self, pkg: AdapterPackage, max_rank: int | None = None) -> int:
        """Install ``pkg`` in this artifact's model and teach its encoder the package's domain
        and the ids it brought (``grown_vocab``), so :meth:`score` serves the domain at once;
        returns the domain's id.

        The in-process twin of registering a package with the service. All or nothing: the
        grown ids are checked against a copy of the encoder and the package against the model
        before either changes, so a refused package (``ArtifactError``) leaves the artifact as
        it was.
        ``max_rank``: refuse adapters of a higher rank. A package whose domain the model
        already has replaces that domain's adapter (and its grown ids, rows included).
        """
        from mdlora.formats.domains import model_domains
        from mdlora.formats.encoder import FeatureEncoder
        from mdlora.formats.grown import place

        encoder = None
        if self.encoder is not None:  # the encoder's change, made on a copy first
            encoder = FeatureEncoder.from_dict(self.encoder)
            domains = model_domains(self.model.config)
            if pkg.division not in domains:
                raise ArtifactError(
                    f"adapter is for division {pkg.division!r}; the model's divisions are "
                    f"{list(domains)}"
                )
            if pkg.domain not in domains[pkg.division]:
                domains[pkg.division].append(pkg.domain)
            try:
                encoder.set_domains(domains)
                encoder.set_grown(pkg.division, pkg.domain, pkg.config.get(GROWN_VOCAB) or {})
            except ValueError as exc:
                raise ArtifactError(f"adapter {pkg.division}/{pkg.domain}: {exc}") from None
        domain_id = apply_adapter(self.model, pkg, max_rank)  # checks, then installs
        if encoder is not None:
            place(encoder, self.model)  # checked above: the rows and the ids agree
            self.encoder = encoder.to_dict()
        if isinstance(pkg.config.get("version"), int):
            self.adapter_versions[(pkg.division, pkg.domain)] = pkg.config["version"]
        return domain_id


def adapter_dir(root: Path, division: str, domain: str, version: int) -> Path:
    return Path(root) / "adapters" / _safe(division) / _safe(domain) / str(version)


def _safe(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"name {name!r} cannot be used as a path component")
    return name


def check_artifact_target(directory: Path | str) -> None:
    """Refuse (``ArtifactError``) to write an artifact where that would lose something: over
    a file, a non-empty folder that holds no artifact, or an artifact a service has
    registered adapters on (they would be dropped, and a service still serving it would
    write its registry back into the new artifact). Writers call it before long work."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is a file, not a folder: write the artifact elsewhere")
    if not any(directory.iterdir()):
        return
    if not (directory / MANIFEST).is_file():
        raise ArtifactError(
            f"{directory} is not empty and holds no mdlora artifact ({MANIFEST} is missing): "
            "refusing to replace what is in it; write the artifact to a new or empty folder"
        )
    if (directory / REGISTRY).exists():
        raise ArtifactError(
            f"{directory} holds adapters registered with a service ({REGISTRY}): writing over "
            "it would drop them, and a service still serving it would write its registry back "
            "into the new artifact; write the new artifact to another folder, or stop the "
            "service and remove this one first"
        )


def save_artifact(
    model: MultiDomainModel,
    directory: Path | str,
    encoder: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and the encoder dict) as an artifact directory.

    Written to a temporary sibling and renamed into place, so a crash never leaves half an
    artifact where a previous one was. Replaces an artifact already there, nothing else
    (:func:`check_artifact_target`).
    """
    directory = Path(directory)
    check_artifact_target(directory)
    problem = disagreement(encoder or {}, model.config)
    if problem:  # the model's divisions own the domain list (mdlora.formats.domains)
        raise ArtifactError(
            f"cannot save the artifact {directory}: {problem}; give the encoder the model's "
            "domains (FeatureEncoder.set_domains(model_domains(model.config)))"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(directory)
    try:
        shared = shared_tensors(model)
        gate = {k: v for k, v in shared.items() if k.startswith(GATE_PREFIXES)}
        backbone = {k: v for k, v in shared.items() if k not in gate}
        files: dict[str, Any] = {}
        for name, tensors in ((BACKBONE_WEIGHTS, backbone), (GATE_WEIGHTS, gate)):
            if not tensors:
                continue
            data = backbone_bytes(tensors)
            (tmp / name).write_bytes(data)
            files[name] = {"sha256": sha256_bytes(data), "tensors": describe_tensors(tensors)}
        digest = files.get(BACKBONE_WEIGHTS, {}).get("sha256")
        adapters = []
        cfg = model.config
        adapted = model.method.adapted
        grown = (encoder or {}).get("grown") or {}
        for div in cfg.divisions[:adapted]:
            for dom in div.domains:
                values = grown.get(div.name, {}).get(dom)
                more = {GROWN_VOCAB: values} if values else {}
                pkg = make_adapter_package(model, div.name, dom, 1, digest, **more)
                path = write_adapter_package(pkg, adapter_dir(tmp, div.name, dom, 1))
                adapters.append({
                    "division": div.name, "domain": dom, "version": 1,
                    "path": str(path.relative_to(tmp)),
                    "sha256": sha256_bytes((path / ADAPTER_WEIGHTS).read_bytes()),
                })  # fmt: skip
        encoder_bytes = None if encoder is None else json.dumps(encoder).encode()
        if encoder_bytes is not None:
            (tmp / ENCODER).write_bytes(encoder_bytes)
        manifest = {
            "format": "mdlora-artifact",
            "schema_version": SCHEMA_VERSION,
            "model": cfg.to_dict(),
            "model_signature": model_signature(cfg),
            "stage": {"name": model.stage.name, "division": model.stage.division},
            "routing": model.routing,
            "files": files,
            "encoder": ENCODER if encoder is not None else None,
            **({"encoder_sha256": sha256_bytes(encoder_bytes)} if encoder_bytes else {}),
            "adapters": adapters,
            "metrics": metrics or {},
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an mdlora artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if manifest.get("format") != "mdlora-artifact":
        raise ArtifactError(f"{path} is not an mdlora manifest (format field)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {manifest.get('schema_version')} is not supported "
            f"(this mdlora reads version {SCHEMA_VERSION})"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: {problem}; re-export the artifact (mdlora export --run RUN)")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a manifest's fields that loading reads."""
    if not isinstance(m.get("model"), dict):
        return "'model' (the model config) is missing or not an object"
    files = m.get("files")
    if not isinstance(files, dict):
        return "'files' (the weight files and their checksums) is missing or not an object"
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                and isinstance(info.get("tensors"), dict)):  # fmt: skip
            return f"files[{name!r}] needs a 'sha256' string and a 'tensors' object"
    adapters = m.get("adapters", [])
    if not isinstance(adapters, list):
        return "'adapters' is not a list"
    for i, a in enumerate(adapters):
        keys = ("division", "domain", "version", "path", "sha256")
        if not (isinstance(a, dict) and all(k in a for k in keys)):
            return f"adapters[{i}] needs {', '.join(keys)}"
    if m.get("encoder") is not None and not isinstance(m["encoder"], str):
        return "'encoder' is not a file name"
    return None


def _read_listed(directory: Path, name: str, sha256: str | None) -> bytes:
    """The bytes of a file the manifest lists, refused when missing or when they do not have
    the checksum it records (``None``: none recorded, as for older artifacts' encoders)."""
    path = directory / name
    if not path.is_file():
        raise ArtifactError(f"{directory}: {name} is listed in the manifest but missing")
    data = path.read_bytes()
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise ArtifactError(
            f"{path}: checksum does not match the manifest (file changed?); put back the file "
            "the artifact was saved with, or re-export it"
        )
    return data


def _read_encoder(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The artifact's encoder dict, checked against the manifest's checksum (artifacts
    written before it was recorded have none)."""
    path = directory / manifest["encoder"]
    data = _read_listed(directory, manifest["encoder"], manifest.get("encoder_sha256"))
    try:
        encoder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(encoder, dict):
        raise ArtifactError(f"{path} is not an encoder (a JSON object is expected)")
    return encoder


#: the rank temperatures that configs saved without ``alpha`` and ``ranks`` were built with
#: (the core once defaulted to MLoRA's published MovieLens values; training now saves alpha)
LEGACY_ALPHA: dict[str, float] = {
    "autoint": 4, "dcn": 16, "deepfm": 32, "fibinet": 32, "nfm": 4,
    "pnn": 16, "wdl": 16, "xdeepfm": 32, "mlp": 16,
}  # fmt: skip


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A saved model config; one without ``alpha`` and ``ranks`` gets the ranks it had."""
    if d.get("alpha") is None and d.get("ranks") is None:
        d = {**d, "alpha": LEGACY_ALPHA.get(str(d.get("backbone")), 16)}
    return ModelConfig.from_dict(d)


def check_artifact(directory: Path | str) -> dict[str, Any]:
    """Check an artifact's files without building its model (``ArtifactError`` says what is
    wrong): the manifest, and every weight file, adapter package and the encoder present
    with the checksum the manifest records. A command checks this before it starts a server,
    so a broken artifact stops it with one line. Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = [(name, info["sha256"]) for name, info in manifest["files"].items()]
    listed += [(str(Path(a["path"]) / ADAPTER_WEIGHTS), a["sha256"]) for a in manifest["adapters"]]
    for name, want in listed:
        _read_listed(directory, name, want)
    if manifest.get("encoder"):
        _read_encoder(directory, manifest)
    return manifest


def load_artifact(directory: Path | str, map_location: str | torch.device = "cpu") -> Artifact:
    """Rebuild the model of an artifact directory, checking every file against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        config = model_config_from_dict(manifest["model"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(
            f"{directory}: the manifest's model config is invalid ({exc})"
        ) from None
    encoder = None
    if manifest.get("encoder"):
        encoder = _read_encoder(directory, manifest)
        problem = disagreement(encoder, config, "manifest's")
        if problem:  # never serve one list and encode with another
            raise ArtifactError(
                f"artifact {directory}: {problem}; its {manifest['encoder']} belongs to another "
                "export or was edited: re-export the artifact (mdlora export --run RUN) or put "
                "back the encoder it was saved with"
            )
    model = MultiDomainModel(config)
    shared: dict[str, Tensor] = {}
    for name, info in manifest["files"].items():
        path = directory / name
        data = _read_listed(directory, name, info["sha256"])
        tensors = load_safetensors_bytes(data, str(path))
        try:
            check_tensors(expected_tensors(info["tensors"]), tensors, str(path))
        except TensorMismatchError as exc:
            raise ArtifactError(str(exc)) from None
        shared.update(tensors)
    try:
        load_shared(model, shared)
    except TensorMismatchError as exc:
        raise ArtifactError(f"{directory}: {exc}") from None
    versions: dict[tuple[str, str], int] = {}
    for entry in manifest["adapters"]:
        pkg_dir = directory / entry["path"]
        pkg = read_adapter_package(pkg_dir)
        if sha256_bytes((pkg_dir / ADAPTER_WEIGHTS).read_bytes()) != entry["sha256"]:
            raise ArtifactError(f"{pkg_dir}: checksum does not match the manifest")
        apply_adapter(model, pkg)
        versions[(entry["division"], entry["domain"])] = int(entry["version"])
    stage = manifest.get("stage", {})
    model.set_stage(stage.get("name", "backbone"), division=stage.get("division"))
    model.set_routing(manifest.get("routing", "bag"))
    model.eval()
    return Artifact(model.to(map_location), manifest, encoder, directory, versions)
