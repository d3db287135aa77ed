"""Adapter packages: one domain's adapter (``adapter_config.json`` +
``adapter_model.safetensors``), what ``mdlora add-domain`` writes, the service's admin API
accepts and an artifact keeps under ``adapters/``. Building, parsing and applying them; every
load checks names, shapes, dtypes, finiteness and checksums before a tensor reaches the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from mdlora.formats.fileio import atomic_write
from mdlora.formats.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    GATE_PREFIXES,
    GROWN_VOCAB,
    SCHEMA_VERSION,
    ArtifactError,
    _is_pickle,
    describe_tensors,
    error_text,
    expected_tensors,
    load_safetensors_bytes,
    model_signature,
    sha256_bytes,
)
from mdlora.models.model import MultiDomainModel
from mdlora.models.rows import EMBEDDING_ROWS, rows_signature
from mdlora.models.state import (
    TensorMismatchError,
    adapter_signature,
    adapter_tensors,
    check_rows,
    check_tensors,
    install_adapter,
    shared_tensors,
    split_rows,
)


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


def backbone_bytes(tensors: dict[str, Tensor]) -> bytes:
    return st_save({k: v.cpu() for k, v in tensors.items()}, metadata={"format": "pt"})


def backbone_digest(model: MultiDomainModel) -> str:
    """sha256 of the backbone weights as an artifact stores them (``backbone.safetensors``).

    An adapter package records it, so a server refuses an adapter trained against another
    backbone even when the architecture and vocabularies (``model_signature``) are the same.
    """
    return sha256_bytes(backbone_bytes(backbone_tensors(model)))


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
        "tensors": describe_tensors(tensors),
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
    atomic_write(directory / ADAPTER_WEIGHTS, weights)
    atomic_write(directory / ADAPTER_CONFIG, config_bytes)
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
        expected = expected_tensors(config["tensors"])
        # float16 / bfloat16 / float64 weights are cast to the float type the config names
        tensors = _conform_dtypes(tensors, expected)
        check_tensors(expected, tensors, ADAPTER_WEIGHTS)
    except TensorMismatchError as exc:
        raise ArtifactError(str(exc)) from None
    return AdapterPackage(config, tensors)


def _check_config_fields(config: dict[str, Any]) -> None:
    """Types of the config fields a server reads (so a malformed config is a 4xx, not a crash)."""
    where = ADAPTER_CONFIG
    for key in ("division", "domain", "model_signature", "method", "backbone", "tensors"):
        if key not in config:
            raise ArtifactError(f"{where} lacks the {key!r} field")
    for key in ("division", "domain", "model_signature", "method", "backbone", "backbone_sha256"):
        if key in config and not isinstance(config[key], str):
            raise ArtifactError(f"{where}: {key!r} must be a string, got {config[key]!r}")
    if not config["domain"].strip():
        raise ArtifactError("adapter domain name is empty")
    if config["domain"] != config["domain"].strip():
        # " d1 " would be a domain of its own beside "d1", reachable only by that exact name
        raise ArtifactError(
            f"adapter domain name {config['domain']!r} starts or ends with white space"
        )
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
    if rows is None:
        raise ArtifactError(
            f"{where}: {GROWN_VOCAB!r} lists grown ids but 'tensors' has no {EMBEDDING_ROWS!r} "
            "for their rows"
        )
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
        for k, v in vocab.items()
    ):
        raise ArtifactError(
            f"{where}: {GROWN_VOCAB!r} must map column names to lists of string values"
            + (f" (the package has {EMBEDDING_ROWS!r} rows for them)" if rows else "")
        )
    own = vocab.get(str(config.get("division")))
    if own is not None and own != [config.get("domain")]:
        # the division's own column grew exactly the new domain's name (add-domain)
        raise ArtifactError(
            f"{where}: the package's grown ids are for domain {own} but it names domain "
            f"{config.get('domain')!r} (was its config edited?): a package's rows belong to "
            "the domain it was trained for"
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
    _check_grown_fields(dict(pkg.config, tensors=describe_tensors(pkg.tensors)))


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
    """Validate ``pkg`` against ``model`` and install it (adds the domain if new).

    The model only: an encoder beside it does not learn the domain or the ids the package
    brought. ``Artifact.apply_adapter`` does both."""
    check_adapter_fits(model, pkg, max_rank)
    scope = pkg.config.get("gate_scope")
    return install_adapter(
        model, pkg.division, pkg.domain, pkg.tensors, None if scope is None else str(scope)
    )
