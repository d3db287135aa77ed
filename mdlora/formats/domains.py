"""The domain list has one owner: the model's divisions (``ModelConfig.divisions``).

Every division's domain names, in id order, are held by the model's config (saved in the
artifact's manifest): the adapters, the gate and the norms are sized by them, adapter packages
and the service name domains by them, and a model has them with or without an encoder.

The feature encoder's ``domains`` (and ``domain_order`` where one was declared) is where the
names come FROM at fit time (training builds the model's divisions from them); once a model
exists, the encoder's lists are a copy of the model's:

* ``mdlora add-domain`` adds the domain to the model and gives the encoder the model's lists
  (:meth:`FeatureEncoder.set_domains` with :func:`model_domains`);
* ``save_artifact`` refuses an encoder whose lists are not the model's, and ``load_artifact``
  refuses an artifact whose ``encoder.json`` lists differ from its manifest
  (:func:`disagreement`): the two can never silently disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mdlora.formats.keys import canonical_value

if TYPE_CHECKING:
    from mdlora.models.model import ModelConfig

#: the encoder's fields that list domain names per division
ENCODER_FIELDS = ("domains", "domain_order")


def model_domains(config: ModelConfig) -> dict[str, list[str]]:
    """Every division's domain names in id order, as the model holds them."""
    return {d.name: list(d.domains) for d in config.divisions}


def names(values: Sequence[Any], what: str) -> list[str]:
    """Domain names as the encoder keys them (canonical strings), refusing missing and
    repeated names."""
    keys = [canonical_value(v) for v in values]
    if any(k is None for k in keys):
        raise ValueError(f"{what}: a domain name cannot be missing/None")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{what}: domain names repeat: {list(values)}")
    return [str(k) for k in keys]


def extended(
    have: Mapping[str, list[str]], new: Mapping[str, Sequence[Any]]
) -> dict[str, list[str]]:
    """``new`` as the encoder's lists, after checking it keeps every id ``have`` gives: the
    same divisions, each list starting with the names it had (domains are only appended)."""
    if set(new) != set(have):
        raise ValueError(
            f"the domain lists are for divisions {list(new)}, the encoder's are {list(have)}"
        )
    out = {div: names(new[div], f"division {div!r}") for div in have}
    for div, old in have.items():
        if out[div][: len(old)] != old:
            raise ValueError(
                f"division {div!r}: domains {out[div]} do not extend the encoder's {old} "
                "(existing domain ids would change)"
            )
    return out


def disagreement(
    encoder: Mapping[str, Any], config: ModelConfig, owner: str = "model's"
) -> str | None:
    """What an encoder's dict (``FeatureEncoder.to_dict``) lists differently from the model's
    divisions (``owner`` names them in the message), or None when they agree. Only a fitted
    encoder's lists are compared (its ``domain_order`` for the divisions it declares one for)."""
    if not encoder.get("fitted") or not isinstance(encoder.get("domains"), Mapping):
        return None
    model = model_domains(config)
    for field in ENCODER_FIELDS:
        theirs: Mapping[str, Any] = encoder.get(field) or {}
        divisions = model if field == "domains" else theirs
        for div in dict.fromkeys([*divisions, *theirs]):
            a, b = theirs.get(div), model.get(div)
            if _keys(a) != _keys(b):
                return (
                    f"the encoder's {field} for division {div!r} {_show(a)} differ from the "
                    f"{owner} {_show(b)}"
                )
    return None


def _keys(values: Sequence[Any] | None) -> list[str | None] | None:
    return None if values is None else [canonical_value(v) for v in values]


def _show(values: Sequence[Any] | None) -> str:
    return "(none)" if values is None else str(list(values))
