"""A model's weights as named tensor groups: shared weights, and one adapter per domain.

This is the in-memory half of the artifact format (the files are written by
``mdlora.formats.artifact``): ``shared_tensors`` is everything that is not one domain's adapter (the
backbone, plus the MoE gate or MultiLoRA fusion and cell norms), and ``adapter_tensors`` is one
domain's own rows with PEFT-like names. ``install_adapter`` validates a domain's tensors
against the model (names, shapes, dtypes, finite values) before it changes anything.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor

from mdlora.models.layers import shallow_module
from mdlora.models.model import MultiDomainModel
from mdlora.models.rows import (
    EMBEDDING_ROWS,
    LINEAR_ROWS,
    domain_rows,
    rows_signature,
    set_domain_rows,
)

log = logging.getLogger("mdlora.models")

ADAPTER_PREFIXES = ("tower.banks.", "tower.lora_sets.", "tower.domain_norms.div:")


class TensorMismatchError(ValueError):
    """A tensor file does not fit the model: the message names the tensor and both shapes."""


#: tables whose rows past ``base_rows`` are grown per domain (``mdlora.models.rows``)
GROWN_TABLES = ("embedding.weight", "linear.weight")


def _base_part(model: MultiDomainModel, name: str, t: Tensor) -> Tensor:
    """``t`` without the rows grown for added domains (those travel with their adapters)."""
    if name in GROWN_TABLES:
        return t[: getattr(model, name.split(".")[0]).base_rows]
    return t


def shared_tensors(model: MultiDomainModel) -> dict[str, Tensor]:
    """All weights and buffers except the per-domain adapter banks, domain norms and grown
    embedding rows."""
    return {
        k: _base_part(model, k, v.detach()).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(ADAPTER_PREFIXES)
    }


def load_shared(model: MultiDomainModel, tensors: dict[str, Tensor]) -> None:
    """Load ``shared_tensors`` output into ``model`` after checking every name and shape."""
    expected = shared_tensors(model)
    check_tensors(expected, tensors, "shared weights")
    state = model.state_dict()
    with torch.no_grad():
        for k, v in tensors.items():
            _base_part(model, k, state[k]).copy_(v)
    model._inference_cache = None


def copy_on_write(model: MultiDomainModel) -> MultiDomainModel:
    """A model that shares every tensor except the per-domain ones, which are copied.

    Installing, adding or growing a domain in the copy leaves ``model`` (and its scores)
    unchanged: the banks, gate, LoRA sets and domain norms are copied in full, and the
    embedding tables are replaced, never written, when rows are grown (``mdlora.models.rows``). Only
    the path to the per-domain modules is copied (a handful of small objects), so building a
    serving snapshot holds the interpreter lock for well under a millisecond.
    """
    clone = shallow_module(model)
    clone.tower = tower = shallow_module(model.tower)
    for name in ("banks", "lora_sets", "domain_norms"):
        part = getattr(model.tower, name)
        if part is not None:
            setattr(tower, name, copy.deepcopy(part))
    if model.gate is not None:
        clone.gate = copy.deepcopy(model.gate)
    clone._inference_cache = None
    return clone


def _adapted(model: MultiDomainModel, division: str) -> int:
    cfg = model.config
    i = cfg.division_index(division)
    if i >= model.method.adapted:
        raise ValueError(
            f"division {division!r} has no per-domain adapters in a {cfg.method} model"
        )
    return i


def adapter_tensors(model: MultiDomainModel, division: str, domain: str) -> dict[str, Tensor]:
    """One domain's adapter: its rows of every bank (and gate / norm rows), by name."""
    _adapted(model, division)
    names = model.domain_names(division)
    if domain not in names:
        raise KeyError(f"unknown domain {domain!r} in division {division!r}; known: {names}")
    d = names.index(domain)
    out = {k: t[i] for k, (t, i) in model.method.slots(model, division, d).items()}
    out.update(domain_rows(model, division, domain))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def split_rows(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(adapter tensors, grown embedding rows)`` of one domain's tensors."""
    rows = {k: v for k, v in tensors.items() if k in (EMBEDDING_ROWS, LINEAR_ROWS)}
    return {k: v for k, v in tensors.items() if k not in rows}, rows


def check_rows(model: MultiDomainModel, rows: dict[str, Tensor], what: str) -> None:
    """Grown rows must have the model's shapes and dtypes, all finite (or be absent)."""
    if not rows:
        return
    emb = rows.get(EMBEDDING_ROWS)
    n = int(emb.shape[0]) if emb is not None and emb.dim() == 2 else -1
    if n < 0:
        raise TensorMismatchError(
            f"{what}: grown rows need {EMBEDDING_ROWS!r} of shape [rows, "
            f"{model.embedding.dim}] (got {None if emb is None else tuple(emb.shape)})"
        )
    check_tensors(rows_signature(model, n), rows, what)


def adapter_signature(
    model: MultiDomainModel, division: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes a domain adapter of ``division`` must have for this model."""
    _adapted(model, division)
    probe, _ = split_rows(adapter_tensors(model, division, model.domain_names(division)[0]))
    return {k: (tuple(v.shape), v.dtype) for k, v in probe.items()}


def check_tensors(
    expected: dict[str, Tensor] | dict[str, tuple[tuple[int, ...], torch.dtype]],
    given: dict[str, Tensor],
    what: str,
) -> None:
    """Raise :class:`TensorMismatchError` unless ``given`` has exactly the expected tensors."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing:
        raise TensorMismatchError(f"{what}: missing tensor(s) {missing}")
    if extra:
        raise TensorMismatchError(f"{what}: unexpected tensor(s) {extra}")
    for name, exp in expected.items():
        shape, dtype = (tuple(exp.shape), exp.dtype) if isinstance(exp, Tensor) else exp
        got = given[name]
        if tuple(got.shape) != shape:
            raise TensorMismatchError(
                f"{what}: tensor {name!r} has shape {tuple(got.shape)}, expected {shape}"
            )
        if got.dtype != dtype:
            raise TensorMismatchError(
                f"{what}: tensor {name!r} is {str(got.dtype).removeprefix('torch.')}, expected "
                f"{str(dtype).removeprefix('torch.')}"
            )
        if (
            got.is_floating_point()
            and not bool(torch.isfinite(got).all())
            and not name.endswith(("mask",))
        ):
            raise TensorMismatchError(f"{what}: tensor {name!r} has NaN or infinite values")


def gate_scope_conflict(
    model: MultiDomainModel, division: str, domain: str, gate_scope: str | None
) -> str | None:
    """Why an adapter asking for ``gate_scope`` does not fit ``domain``'s gate row, or None.

    The scope is fixed when a domain is added; an adapter trained against the other row
    would be served with a gate it was not trained with.
    """
    names = model.domain_names(division)
    if domain not in names or gate_scope is None or model.gate is None:
        return None
    held = model.gate.scope(names.index(domain))
    if held == gate_scope:
        return None
    return (
        f"{division}/{domain} is served with gate scope {held!r} and this adapter asks for "
        f"{gate_scope!r}; the scope is fixed when a domain is added, so remove the domain "
        "first (DELETE its adapter) to register it with another scope"
    )


@torch.no_grad()
def install_adapter(
    model: MultiDomainModel,
    division: str,
    domain: str,
    tensors: dict[str, Tensor],
    gate_scope: str | None = None,
) -> int:
    """Write one domain's adapter into ``model``, adding the domain if it is new.

    ``gate_scope`` (MoE): which experts a new domain's gate row sees (``"all"`` when None).
    The scope is fixed when a domain is added: for an existing domain a different scope is
    logged and the served row kept (registration refuses it: :func:`gate_scope_conflict`).
    Everything is validated before the model changes; on error the model is untouched.
    Returns the domain id.
    """
    _adapted(model, division)
    tensors, grown_rows = split_rows(tensors)
    check_tensors(adapter_signature(model, division), tensors, f"adapter {division}/{domain}")
    check_rows(model, grown_rows, f"adapter {division}/{domain}")
    if gate_scope not in (None, "all", "own"):
        raise ValueError(f"gate_scope must be 'all' or 'own', got {gate_scope!r}")
    names = model.domain_names(division)
    conflict = gate_scope_conflict(model, division, domain, gate_scope)
    if conflict:  # (registration refuses this first; a stored older package still loads)
        log.warning("%s; keeping the served gate row", conflict)
    device = model.device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    d = (
        names.index(domain)
        if domain in names
        else model.add_domain(division, domain, gate_scope or "all")
    )
    for name, (t, i) in model.method.slots(model, division, d).items():
        t[i] = tensors[name]
    if grown_rows or (division, domain) in model.grown:
        set_domain_rows(model, division, domain, grown_rows)
    model._inference_cache = None
    return d
