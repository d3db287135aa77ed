"""What the admin API shows and warns of: a domain's adapter versions (served, registered,
the artifact's own), and the warnings a registration's answer carries."""

from __future__ import annotations

from typing import Any

from mdlora.service.errors import NotFound
from mdlora.service.registry import DomainKey, RegistryState
from mdlora.service.snapshot import LoadedAdapter, Snapshot


def describe_domain(
    snap: Snapshot, state: RegistryState, artifact: LoadedAdapter | None, key: DomainKey
) -> dict[str, Any]:
    """``key``'s served version and every version it has had (``artifact``: the version the
    artifact was trained with, if any); NotFound when it has neither."""
    served = snap.adapters.get(key)
    entry = state.domains.get(key)
    if served is None and entry is None:
        raise NotFound(f"no adapter for {key[0]}/{key[1]}")
    versions = []
    if artifact is not None:
        versions.append(
            {"version": artifact.version, "origin": "artifact", "sha256": artifact.sha256}
        )
    versions += [r.view() for r in (entry.versions if entry else ())]
    return {
        "division": key[0],
        "domain": key[1],
        "active_version": served.version if served else None,
        "origin": served.origin if served else None,
        "trained_with_artifact": artifact is not None,
        # ids the served version brought that the export never saw (new users, items)
        "grown_ids": sum(len(v) for v in snap.grown.get(key, {}).values()),
        "versions": versions,
    }


def registration_warnings(
    config: dict[str, Any], sharers: list[str], key: DomainKey
) -> list[str]:
    """What a registration's answer warns of: a package that names no backbone checksum,
    and (MoE-MLoRA) the other domains whose gates mix this domain's experts."""
    out = []
    if "backbone_sha256" not in config:
        out.append(
            "the package does not name the backbone it was trained against (backbone_sha256; "
            "written by an older mdlora or edited), so that could not be checked: make sure "
            "it was trained against this export"
        )
    if sharers:
        out.append(
            f"MoE-MLoRA: the gates of {len(sharers)} other domain(s) ({sharers[:5]}) mix "
            f"{key[0]}/{key[1]}'s experts, so this version changes their scores too (roll back "
            "to undo it)"
        )
    return out
