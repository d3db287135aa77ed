"""What the artifact and adapter-package readers share: the file names (spelt only here),
the one error type, checksums, the safe safetensors reader (never pickle) and the model
signature an adapter must agree with."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import Tensor

from mdlora.formats.safetensors_header import header_problem
from mdlora.models.model import ModelConfig

SCHEMA_VERSION = 1


#: the file names of an artifact and of an adapter package (the one place they are spelt)
MANIFEST = "manifest.json"
#: what a service keeps of the adapters registered on an artifact folder (service.registry)
REGISTRY = "registry.json"


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


def describe_tensors(tensors: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """``name -> {shape, dtype}`` of tensors, as a manifest lists them."""
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in sorted(tensors.items())
    }


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in manifest")
    return dtype


def expected_tensors(
    listing: dict[str, dict[str, Any]],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A manifest's tensor listing as ``name -> (shape, dtype)``."""
    return {k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in listing.items()}


def _is_pickle(data: bytes) -> bool:
    """A torch.save zip archive or a raw pickle (protocol 2, 4 or 5). Not a (truncated)
    safetensors file whose header length happens to start so (a 640-byte header is
    ``80 02 00 ...``): there the JSON header opens at byte 8."""
    if data[8:9] == b"{":
        return False
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
