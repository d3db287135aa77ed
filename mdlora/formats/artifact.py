"""The artifact directory: the plain, pickle-free format training writes and serving loads.

::

    manifest.json                       schema version, model config, stage, tensor lists,
                                        adapter list with versions and checksums, metrics
    encoder.json                        the feature encoder (vocabularies), when given
    backbone.safetensors                the frozen backbone
    gate.safetensors                    MoE gate / MultiLoRA fusion and cell norms (if any)
    adapters/<division>/<domain>/<version>/adapter_config.json
                                       /adapter_model.safetensors

An adapter package (the last two files) is also what ``mdlora add-domain`` writes and what
the service's admin API accepts. Every load checks names, shapes, dtypes, finiteness and
SHA-256 checksums before a tensor reaches the model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from mdlora.formats.fileio import atomic_write, staging_dir
from mdlora.formats.safetensors_header import header_problem
from mdlora.models.features import EncodedBatch
from mdlora.models.model import ModelConfig, MultiDomainModel
from mdlora.models.rows import EMBEDDING_ROWS, rows_signature
from mdlora.models.state import (
    TensorMismatchError,
    adapter_signature,
    adapter_tensors,
    check_rows,
    check_tensors,
    install_adapter,
    load_shared,
    shared_tensors,
    split_rows,
)

SCHEMA_VERSION = 1
#: the file names of an artifact and of an adapter package (the one place they are spelt)
MANIFEST = "manifest.json"
BACKBONE_WEIGHTS = "backbone.safetensors"
GATE_WEIGHTS = "gate.safetensors"
ENCODER = "encoder.json"
ONNX_MODEL = "model.onnx"  # written next to the artifact by ``mdlora export --onnx``
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GATE_PREFIXES = ("gate.", "tower.fusions.", "tower.domain_norms.cell.")
#: adapter config field: the values a new domain brought, per column, one grown row each
GROWN_VOCAB = "grown_vocab"


class ArtifactError(ValueError):
    """An artifact or adapter package cannot be used; the message says what to fix."""


def error_text(exc: BaseException) -> str:
    """An exception's message for a user: a KeyError's own text, without the repr quotes
    ``str(KeyError("x"))`` adds (stripping quote characters would eat real ones)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return str(exc.args[0])
    return str(exc)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_digest(config: bytes, weights: bytes) -> str:
    """Checksum of a whole adapter package: its config and its weights.

    Two packages can share weights and differ in config (another domain, another gate scope),
    so anything that stores or caches packages keys on this, never on the weights alone.
    """
    h = hashlib.sha256(b"mdlora-adapter-package\0")
    h.update(len(config).to_bytes(8, "little"))
    h.update(config)
    h.update(weights)
    return h.hexdigest()


def _describe(tensors: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in sorted(tensors.items())
    }


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in manifest")
    return dtype


def _expected(listing: dict[str, dict[str, Any]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in listing.items()}


def _is_pickle(data: bytes) -> bool:
    """A torch.save zip archive or a raw pickle (protocol 2, 4 or 5)."""
    return data[:4] == b"PK\x03\x04" or data[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05")


def load_safetensors_bytes(data: bytes, what: str) -> dict[str, Tensor]:
    """Parse safetensors bytes (never pickle), turning any parse failure into ArtifactError."""
    if len(data) < 8:
        raise ArtifactError(f"{what}: not a safetensors file (only {len(data)} bytes)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        # (checked only after the parse failed: a safetensors header length may start so too)
        if _is_pickle(data):
            raise ArtifactError(
                f"{what} is a torch.save / pickle file; pickles are never loaded (they can run "
                "code): save the tensors with safetensors.torch.save_file"
            ) from None
        why = header_problem(data) or str(exc)  # the parser's message names no tensor
        raise ArtifactError(f"{what}: not a valid safetensors file ({why})") from None


def model_signature(config: ModelConfig) -> str:
    """Hash of what an adapter must agree with: backbone, tower, ranks, features, method."""
    key = {
        "backbone": config.backbone,
        "tower": list(config.tower),
        "ranks": config.lora_ranks(),
        "method": config.method,
        "experts_per_domain": config.experts_per_domain,
        "gate_dim": config.gate_dim,
        "embed_dim": config.embed_dim,
        "features": config.features.to_dict(),
        "backbone_options": config.backbone_options,
    }
    return sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]


# ---------------------------------------------------------------------------- adapters
@dataclass
class AdapterPackage:
    """One domain's adapter: its config (JSON) and tensors."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def division(self) -> str:
        return str(self.config["division"])

    @property
    def domain(self) -> str:
        return str(self.config["domain"])


def backbone_tensors(model: MultiDomainModel) -> dict[str, Tensor]:
    """The frozen backbone's weights: what ``backbone.safetensors`` of an artifact holds."""
    return {k: v for k, v in shared_tensors(model).items() if not k.startswith(GATE_PREFIXES)}


def _backbone_bytes(tensors: dict[str, Tensor]) -> bytes:
    return st_save({k: v.cpu() for k, v in tensors.items()}, metadata={"format": "pt"})


def backbone_digest(model: MultiDomainModel) -> str:
    """sha256 of the backbone weights as an artifact stores them (``backbone.safetensors``).

    An adapter package records it, so a server refuses an adapter trained against another
    backbone even when the architecture and vocabularies (``model_signature``) are the same.
    """
    return sha256_bytes(_backbone_bytes(backbone_tensors(model)))


def make_adapter_package(
    model: MultiDomainModel,
    division: str,
    domain: str,
    version: int = 1,
    backbone_sha256: str | None = None,
    **extra: Any,
) -> AdapterPackage:
    """One domain's adapter as a package; ``backbone_sha256`` (computed when None) names the
    backbone it was trained against."""
    tensors = adapter_tensors(model, division, domain)
    cfg = model.config
    config = {
        "format": "mdlora-adapter",
        "schema_version": SCHEMA_VERSION,
        "method": cfg.method,
        "backbone": cfg.backbone,
        "model_signature": model_signature(cfg),
        "backbone_sha256": backbone_sha256 or backbone_digest(model),
        "division": division,
        "domain": domain,
        "version": version,
        "ranks": cfg.lora_ranks(),
        "experts": model.method.experts(cfg),
        "tensors": _describe(tensors),
        **extra,
    }
    return AdapterPackage(config, tensors)


def adapter_package_bytes(pkg: AdapterPackage) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` contents."""
    weights = st_save(pkg.tensors, metadata={"format": "pt"})
    config = dict(pkg.config, sha256=sha256_bytes(weights))
    return json.dumps(config, indent=2, sort_keys=True).encode(), weights


def write_adapter_package(pkg: AdapterPackage, directory: Path) -> Path:
    config_bytes, weights = adapter_package_bytes(pkg)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / ADAPTER_WEIGHTS, weights)
    _atomic_write(directory / ADAPTER_CONFIG, config_bytes)
    return directory


def parse_adapter_package(
    config_bytes: bytes, weights: bytes, max_bytes: int | None = None
) -> AdapterPackage:
    """Parse and self-check a package (JSON config + safetensors), without a model."""
    if max_bytes is not None and len(weights) > max_bytes:
        raise ArtifactError(f"adapter weights are {len(weights)} bytes, over the {max_bytes} limit")
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ArtifactError(f"{ADAPTER_CONFIG} is nested too deeply to be a config") from None
    if not isinstance(config, dict) or config.get("format") != "mdlora-adapter":
        raise ArtifactError(f"{ADAPTER_CONFIG} is not an mdlora adapter config (format field)")
    _check_config_fields(config)
    if "sha256" in config and config["sha256"] != sha256_bytes(weights):
        hint = (
            " (and it is a torch.save / pickle file, which is never loaded)"
            if _is_pickle(weights)
            else ""
        )
        raise ArtifactError(
            f"{ADAPTER_WEIGHTS} does not match the checksum in {ADAPTER_CONFIG}{hint}"
        )
    tensors = load_safetensors_bytes(weights, ADAPTER_WEIGHTS)
    try:
        expected = _expected(config["tensors"])
        # float16 / bfloat16 / float64 weights are cast to the float type the config names
        tensors = _conform_dtypes(tensors, expected)
        check_tensors(expected, tensors, ADAPTER_WEIGHTS)
    except TensorMismatchError as exc:
        raise ArtifactError(str(exc)) from None
    return AdapterPackage(config, tensors)


def _check_config_fields(config: dict[str, Any]) -> None:
    """Types of the config fields a server reads (so a malformed config is a 4xx, not a crash)."""
    where = ADAPTER_CONFIG
    for key in ("division", "domain", "model_signature", "tensors"):
        if key not in config:
            raise ArtifactError(f"{where} lacks the {key!r} field")
    for key in ("division", "domain", "model_signature", "method", "backbone"):
        if key in config and not isinstance(config[key], str):
            raise ArtifactError(f"{where}: {key!r} must be a string, got {config[key]!r}")
    if not config["domain"].strip():
        raise ArtifactError("adapter domain name is empty")
    tensors = config["tensors"]
    if not isinstance(tensors, dict) or not tensors:
        raise ArtifactError(f"{where}: 'tensors' must map tensor names to shape and dtype")
    for name, spec in tensors.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if (
            not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            or not isinstance(spec.get("dtype"), str)
        ):
            raise ArtifactError(
                f'{where}: tensors[{name!r}] must be {{"shape": [ints], "dtype": str}}, '
                f"got {spec!r}"
            )
    ranks = config.get("ranks", [1])
    if (
        not isinstance(ranks, list)
        or not ranks
        or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks)
    ):
        raise ArtifactError(f"{where}: 'ranks' must be a list of positive integers, got {ranks!r}")
    scope = config.get("gate_scope", "all")
    if scope not in ("all", "own"):
        raise ArtifactError(f"{where}: 'gate_scope' must be 'all' or 'own', got {scope!r}")
    for key in ("version", "experts", "schema_version"):
        v = config.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ArtifactError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    if config.get("schema_version", 1) > SCHEMA_VERSION:
        raise ArtifactError(
            f"{where}: schema_version {config['schema_version']} was written by a newer mdlora "
            f"(this one reads up to {SCHEMA_VERSION}); upgrade the server"
        )
    sha = config.get("sha256", "")
    if not isinstance(sha, str):
        raise ArtifactError(f"{where}: 'sha256' must be a hex string, got {sha!r}")
    _check_grown_fields(config)


def _check_grown_fields(config: dict[str, Any]) -> None:
    """``grown_vocab`` (the ids a new domain brought) and its rows must come together."""
    where = ADAPTER_CONFIG
    vocab = config.get(GROWN_VOCAB)
    rows = config["tensors"].get(EMBEDDING_ROWS)
    if vocab is None and rows is None:
        return
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
        for k, v in vocab.items()
    ):
        raise ArtifactError(
            f"{where}: {GROWN_VOCAB!r} must map column names to lists of string values"
            + (f" (the package has {EMBEDDING_ROWS!r} rows for them)" if rows else "")
        )
    n = sum(len(v) for v in vocab.values())
    n_rows = rows["shape"][0] if rows is not None and rows["shape"] else 0
    if n != n_rows:
        raise ArtifactError(
            f"{where}: {GROWN_VOCAB!r} lists {n} value(s) but {EMBEDDING_ROWS!r} has {n_rows} "
            "row(s); every grown value needs exactly one row"
        )


def read_adapter_package(directory: Path, max_bytes: int | None = None) -> AdapterPackage:
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory}: {name} is missing")
    return parse_adapter_package(
        (directory / ADAPTER_CONFIG).read_bytes(), (directory / ADAPTER_WEIGHTS).read_bytes(),
        max_bytes,
    )  # fmt: skip


def check_adapter_fits(
    model: MultiDomainModel,
    pkg: AdapterPackage,
    max_rank: int | None = None,
    backbone_sha256: str | None = None,
) -> None:
    """Refuse a package that does not fit ``model`` (ArtifactError says why).

    ``backbone_sha256``: the serving artifact's backbone digest; a package that names another
    one was trained against other backbone weights and is refused (packages written before
    the field existed name none and are checked on their signature and tensors only).
    """
    cfg = model.config
    if pkg.config.get("method") != cfg.method or pkg.config.get("backbone") != cfg.backbone:
        raise ArtifactError(
            f"adapter is for a {pkg.config.get('method')}/{pkg.config.get('backbone')} model, "
            f"this model is {cfg.method}/{cfg.backbone}"
        )
    if pkg.config["model_signature"] != model_signature(cfg):
        raise ArtifactError(
            "adapter was trained against a different backbone or feature spec "
            f"(signature {pkg.config['model_signature']}, model {model_signature(cfg)})"
        )
    experts = model.method.experts(cfg)
    for key, want in (("ranks", cfg.lora_ranks()), ("experts", experts)):
        if key in pkg.config and pkg.config[key] != want:
            raise ArtifactError(
                f"adapter config says {key} {pkg.config[key]}, this model has {want}"
            )
    theirs = pkg.config.get("backbone_sha256")
    if theirs is not None and backbone_sha256 and theirs != backbone_sha256:
        raise ArtifactError(
            f"adapter was trained against other backbone weights (backbone_sha256 "
            f"{str(theirs)[:12]}..., this model's {backbone_sha256[:12]}...): train it with "
            "`mdlora add-domain --artifact` pointed at the export this server loads"
        )
    if max_rank is not None:
        # the rank is what the tensors hold (lora_A is in x r), whatever the config says
        ranks = [int(t.shape[-1]) for n, t in pkg.tensors.items() if n.endswith("lora_A")]
        rank = max([*ranks, *(pkg.config.get("ranks") or [])], default=0)
        if rank > max_rank:
            raise ArtifactError(
                f"adapter rank {rank} exceeds the cap {max_rank} (MDLORA_MAX_ADAPTER_RANK)"
            )
    try:
        expected = adapter_signature(model, pkg.division)
        tensors, rows = split_rows(pkg.tensors)
        n_rows = int(rows[EMBEDDING_ROWS].shape[0]) if EMBEDDING_ROWS in rows else 0
        expected_rows = rows_signature(model, n_rows) if rows else {}
        pkg.tensors = _conform_dtypes(pkg.tensors, {**expected, **expected_rows})
        tensors, rows = split_rows(pkg.tensors)
        check_tensors(expected, tensors, "adapter")
        check_rows(model, rows, "adapter")
    except (TensorMismatchError, KeyError, ValueError) as exc:
        raise ArtifactError(error_text(exc)) from None
    _check_grown_fields(dict(pkg.config, tensors=_describe(pkg.tensors)))


def _conform_dtypes(
    tensors: dict[str, Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, Tensor]:
    """Floating tensors saved in another float type (float16, bfloat16, float64) cast to the
    model's; a value a float32 cannot hold becomes infinite and is refused by the check."""
    out = {}
    for name, t in tensors.items():
        want = expected.get(name, (None, t.dtype))[1]
        cast = t.is_floating_point() and want.is_floating_point and t.dtype != want
        out[name] = t.to(want) if cast else t
    return out


def apply_adapter(model: MultiDomainModel, pkg: AdapterPackage, max_rank: int | None = None) -> int:
    """Validate ``pkg`` against ``model`` and install it (adds the domain if new)."""
    check_adapter_fits(model, pkg, max_rank)
    scope = pkg.config.get("gate_scope")
    return install_adapter(
        model, pkg.division, pkg.domain, pkg.tensors, None if scope is None else str(scope)
    )


# ---------------------------------------------------------------------------- artifacts
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


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def adapter_dir(root: Path, division: str, domain: str, version: int) -> Path:
    return Path(root) / "adapters" / _safe(division) / _safe(domain) / str(version)


def _safe(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"name {name!r} cannot be used as a path component")
    return name


def save_artifact(
    model: MultiDomainModel,
    directory: Path | str,
    encoder: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and the encoder dict) as an artifact directory.

    Written to a temporary sibling and renamed into place, so a crash never leaves half an
    artifact where a previous one was.
    """
    directory = Path(directory)
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
            data = _backbone_bytes(tensors)
            (tmp / name).write_bytes(data)
            files[name] = {"sha256": sha256_bytes(data), "tensors": _describe(tensors)}
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
        if encoder is not None:
            (tmp / ENCODER).write_text(json.dumps(encoder))
        manifest = {
            "format": "mdlora-artifact",
            "schema_version": SCHEMA_VERSION,
            "model": cfg.to_dict(),
            "model_signature": model_signature(cfg),
            "stage": {"name": model.stage.name, "division": model.stage.division},
            "routing": model.routing,
            "files": files,
            "encoder": ENCODER if encoder is not None else None,
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
    return manifest


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


def load_artifact(directory: Path | str, map_location: str | torch.device = "cpu") -> Artifact:
    """Rebuild the model of an artifact directory, checking every file against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = model_config_from_dict(manifest["model"])
    model = MultiDomainModel(config)
    shared: dict[str, Tensor] = {}
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: {name} is listed in the manifest but missing")
        data = path.read_bytes()
        if sha256_bytes(data) != info["sha256"]:
            raise ArtifactError(f"{path}: checksum does not match the manifest (file changed?)")
        tensors = load_safetensors_bytes(data, str(path))
        try:
            check_tensors(_expected(info["tensors"]), tensors, str(path))
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
    encoder = None
    if manifest.get("encoder"):
        encoder = json.loads((directory / manifest["encoder"]).read_text())
    return Artifact(model.to(map_location), manifest, encoder, directory, versions)
