"""Canary rollouts: a domain's new adapter version takes a share of its users, beside the
active version, until it is promoted or aborted.

State: a rollout lives in the registry, on the domain's entry (``DomainEntry.rollout``), so
starting, promoting and aborting one are registry changes like registrations: compare-and-set,
published to every replica, and read again by a replica that restarts. A domain has at most
one running rollout; a decided one (promoted or aborted, with who decided and why) stays on
the entry until the next rollout of that domain replaces it.

Serving: a snapshot holds the canary's adapter as an extra internal domain of its serving
model (:data:`CANARY_PREFIX` + the domain's name, in the same banks, like the reserved
backbone domain), so a request on either version is one row of the same model call. Which
version a user sees is :func:`in_canary`: a hash of the user id and the rollout's random salt,
compared with the share, so a user keeps one version for the whole rollout, on every replica;
raising the share of a running rollout only moves users onto the canary. A request without
a user id is served the active version.

Limits: versions that bring grown ids (``mdlora.formats.grown``) cannot be canaried (their embedding
rows would have to coexist); a domain added after training with a single version has nothing
to compare against.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from mdlora.formats.adapter_package import AdapterPackage
from mdlora.formats.files import (
    GROWN_VOCAB,
    ArtifactError,
    error_text,
)
from mdlora.models.state import TensorMismatchError, install_adapter, split_rows
from mdlora.service.errors import Conflict, NotFound, Refused, Unavailable
from mdlora.service.registry import (
    DomainKey,
    RegistryConflict,
    RegistryError,
    RegistryState,
    set_active,
)
from mdlora.service.runtime import PROBE_ROWS, runner_of, synthetic_rows
from mdlora.service.snapshot import Canary, LoadedAdapter, Snapshot, cow_copy

if TYPE_CHECKING:
    from mdlora.service.control import ControlPlane

log = logging.getLogger("mdlora.service")
#: internal domain name of a canary (``\x00`` can never be a real name, see snapshot.py)
CANARY_PREFIX = "\x00canary:"
RUNNING, PROMOTED, ABORTED = "running", "promoted", "aborted"
COMMIT_ATTEMPTS = 5


@dataclass(frozen=True)
class Rollout:
    """One canary rollout of a domain (stored as JSON on the registry entry)."""

    id: str
    version: int  # the canary
    stable: int  # the active version when it started (what the canary is judged against)
    percent: float
    salt: str
    state: str = RUNNING
    started_at: float = 0.0
    decided_at: float | None = None
    decided_by: str | None = None  # "admin" or "guard"
    reason: str | None = None

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Rollout | None:
        if not d:
            return None
        try:
            return cls(
                str(d["id"]),
                int(d["version"]),
                int(d["stable"]),
                float(d["percent"]),
                str(d["salt"]),
                str(d.get("state", RUNNING)),
                float(d.get("started_at") or 0.0),
                None if d.get("decided_at") is None else float(d["decided_at"]),
                d.get("decided_by"),
                d.get("reason"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.error("unreadable rollout %r ignored: %s", d, exc)
            return None


def rollout_of(state: RegistryState, key: DomainKey) -> Rollout | None:
    entry = state.domains.get(key)
    return None if entry is None else Rollout.from_dict(entry.rollout)


def user_bucket(salt: str, user_id: Any) -> float:
    """Where ``user_id`` falls in [0, 100) for a rollout with ``salt`` (stable, uniform)."""
    digest = hashlib.blake2b(f"{salt}\x1f{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * (100.0 / 2.0**64)


def in_canary(canary: Canary, user_id: Any) -> bool:
    return user_id is not None and user_bucket(canary.salt, user_id) < canary.percent


# ---------------------------------------------------------------------------- snapshots
def _signature(snapshot: Snapshot) -> dict[DomainKey, tuple[LoadedAdapter, float, str, str]]:
    return {k: (c.loaded, c.percent, c.salt, c.rollout_id) for k, c in snapshot.canaries.items()}


def canary_problem(snapshot: Snapshot, key: DomainKey) -> str | None:
    """Why ``key`` cannot have a canary (None: it can).

    MoE-MLoRA: the canary is a domain of its own with its own experts; a gate row that sees
    only its own experts (scope ``own``) gates a copy exactly as the original, but one that
    sees every expert (``all``, the artifact's domains) would also see the copy's and the
    original's. MultiLoRA: a copy's domain-norm cells are not yet reproduced exactly (scores
    measured 0.004 off), so it is refused rather than judged on other scores.
    """
    method = snapshot.model.method
    if not method.exact_domain_copy:
        return f"canary rollouts are not supported for {method.label} models yet"
    gate = snapshot.model.gate
    if gate is None or key[1] not in snapshot.domain_ids.get(key[0], {}):
        return None
    if gate.scope(snapshot.domain_ids[key[0]][key[1]]) == "own":
        return None
    return (
        f"{key[0]}/{key[1]} is a MoE domain whose gate sees every expert (scope 'all'): a "
        "canary would change its gating; only domains added with gate_scope 'own' can be canaried"
    )


def with_canaries(
    snapshot: Snapshot, specs: list[tuple[DomainKey, AdapterPackage, LoadedAdapter, Rollout]]
) -> Snapshot:
    """A new snapshot: ``snapshot``'s adapters, plus each canary in ``specs`` as an internal
    domain of the serving model (raises ArtifactError / ValueError when one does not fit;
    ``snapshot`` is untouched)."""
    clone = Snapshot(
        snapshot.base, snapshot.model, dict(snapshot.adapters), snapshot.registry_version,
        snapshot.grown,
    )  # fmt: skip
    if not specs:
        return clone
    serving = clone.serving_model
    if serving is clone.model:  # MultiLoRA / base: the serving model is the model itself
        serving = clone.serving_model = cow_copy(clone.model)
    canaries = {}
    for key, pkg, loaded, rollout in specs:
        if pkg.config.get(GROWN_VOCAB) or split_rows(pkg.tensors)[1]:
            raise ArtifactError(f"{key[0]}/{key[1]} v{loaded.version} brings grown ids")
        if clone.grown.get(key):
            raise ArtifactError(f"{key[0]}/{key[1]}'s active version brings grown ids")
        problem = canary_problem(clone, key)
        if problem:
            raise ArtifactError(problem)
        scope = "own" if serving.gate is not None else None
        tensors = {k: v.to(serving.device) for k, v in pkg.tensors.items()}
        domain_id = install_adapter(serving, key[0], CANARY_PREFIX + key[1], tensors, scope)
        canaries[key] = Canary(loaded, domain_id, rollout.percent, rollout.salt, rollout.id)
    serving.eval()
    clone.canaries = canaries
    return clone


def attach(control: ControlPlane, snapshot: Snapshot, state: RegistryState) -> Snapshot:
    """``snapshot`` with the canaries ``state`` runs (itself when it has them already; a new,
    prepared snapshot otherwise). A canary that cannot be loaded is left out and logged."""
    specs = []
    for key, entry in sorted(state.domains.items()):
        rollout = Rollout.from_dict(entry.rollout)
        served = snapshot.adapters.get(key)
        if rollout is None or not rollout.running or served is None:
            continue
        record = entry.record(rollout.version)
        if record is None or served.version == rollout.version:
            continue
        loaded = LoadedAdapter(record.version, record.sha256, "registry")
        specs.append((key, loaded, rollout))
    want = {k: (loaded, r.percent, r.salt, r.id) for k, loaded, r in specs}
    for key in set(want) | set(snapshot.canaries) | set(control.holder.current.canaries):
        control.metrics.rollout_percent.labels(*key).set(want[key][1] if key in want else 0.0)
    if want == _signature(snapshot):
        return snapshot
    packages = []
    for key, loaded, rollout in specs:
        try:
            packages.append((key, control._package(key, loaded, state), loaded, rollout))
        except (RegistryError, ArtifactError) as exc:
            log.error("canary %s/%s v%d not loaded: %s", *key, loaded.version, exc)
    try:
        out = with_canaries(snapshot, packages)
    except (ArtifactError, TensorMismatchError, ValueError, KeyError) as exc:
        log.error("canaries not loaded (%s): serving the active versions only", error_text(exc))
        out = with_canaries(snapshot, [])
    control.prepare(out)
    return out


# ---------------------------------------------------------------------------- decisions
class Rollouts:
    """Start, promote and abort rollouts (each runs on the control plane's builder thread)."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def refuse_change(self, state: RegistryState, key: DomainKey, action: str) -> None:
        """A registration, rollback or removal of a domain with a running rollout is refused."""
        rollout = rollout_of(state, key)
        if rollout is not None and rollout.running:
            raise Conflict(
                f"{key[0]}/{key[1]} has a canary rollout of v{rollout.version} running: promote "
                f"or abort it (POST /v1/rollouts/{key[0]}/{key[1]}/promote or /abort) before "
                f"this {action}",
            )

    def check_start(
        self, current: Snapshot, state: RegistryState, key: DomainKey, percent: float
    ) -> None:
        """Why a canary of ``key`` cannot start now (a ServiceError), else nothing."""
        if not 0.0 <= percent <= 100.0:
            raise Refused(f"percent must be between 0 and 100, got {percent}")
        if key[0] not in current.adapted:
            raise Refused(f"division {key[0]!r} has no adapters to roll out")
        if key not in current.adapters:
            raise Conflict(
                f"{key[0]}/{key[1]} serves no version yet: a new domain has nothing to compare a "
                "canary with; register it without a canary",
            )
        if current.grown.get(key):
            raise Conflict(
                f"{key[0]}/{key[1]}'s active version brings grown ids: no canary possible"
            )
        problem = canary_problem(current, key)
        if problem:
            raise Conflict(problem)

    def register_as_canary(
        self,
        state: RegistryState,
        current: Snapshot,
        key: DomainKey,
        pkg: AdapterPackage,
        record: Any,
        percent: float,
    ) -> RegistryState:
        """The state after registering ``record`` as a canary (the active version stays)."""
        self.refuse_change(state, key, "registration")
        self.check_start(current, state, key, percent)
        if pkg.config.get(GROWN_VOCAB):
            raise Conflict("a version that brings grown ids cannot be a canary")
        entry = state.domains.get(key)
        stable = current.adapters[key].version
        added = set_active(entry, entry.active if entry else None, record)
        rollout = self._new(record.version, stable, percent)
        return state.with_entry(key, replace(added, rollout=rollout))

    @staticmethod
    def _new(version: int, stable: int, percent: float) -> dict[str, Any]:
        return Rollout(
            uuid.uuid4().hex[:16], version, stable, float(percent), uuid.uuid4().hex,
            RUNNING, time.time(),
        ).to_dict()  # fmt: skip

    def start(self, key: DomainKey, version: int, percent: float) -> dict[str, Any]:
        """Serve registered ``version`` of ``key`` to ``percent`` of its users; on a running
        rollout of the same version, change its share (users keep their bucket)."""
        control = self.control
        for _ in range(COMMIT_ATTEMPTS):
            state = control._read()
            current = control._sync(state)
            self.check_start(current, state, key, percent)
            entry = state.domains.get(key)
            record = entry.record(version) if entry else None
            if entry is None or record is None:
                listed = [r.version for r in entry.versions] if entry else []
                raise NotFound(
                    f"{key[0]}/{key[1]} has no registered version {version} (registered: "
                    f"{listed}); register it with POST /v1/adapters (canary_percent) first",
                )
            stable = current.adapters[key].version
            running = Rollout.from_dict(entry.rollout)
            if running is not None and running.running:
                if running.version != version:
                    raise Conflict(
                        f"{key[0]}/{key[1]} has a rollout of v{running.version} running: "
                        "promote or abort it first",
                    )
                rollout = replace(running, percent=float(percent)).to_dict()
            elif version == stable:
                raise Conflict(f"v{version} is already the active version")
            else:
                rollout = self._new(version, stable, percent)
            new = state.with_entry(key, replace(entry, rollout=rollout))
            snapshot = attach(control, current.with_registry_version(new.version), new)
            canary = snapshot.canaries.get(key)
            if canary is None or canary.loaded.version != version:
                raise Conflict(
                    f"{key[0]}/{key[1]} v{version} cannot be loaded as a canary (see logs)"
                )
            problem = _probe(snapshot, key, canary)
            if problem:
                raise Refused(f"canary refused: {problem}")
            try:
                control._commit(
                    state, new, snapshot, None,
                    {"action": "rollout", "division": key[0], "domain": key[1]},
                )  # fmt: skip
            except RegistryConflict:
                continue
            control.metrics.rollout_decisions.labels("start", "admin").inc()
            log.info("rollout %s/%s v%d at %s%%", key[0], key[1], version, percent)
            return self.describe(key)
        raise Unavailable("the registry kept changing under this change; retry")

    def decide(
        self,
        key: DomainKey,
        decision: str,
        by: str = "admin",
        reason: str | None = None,
        rollout_id: str | None = None,
    ) -> dict[str, Any]:
        """Promote (the canary becomes the active version for everyone) or abort (everyone
        back on the active version) the running rollout of ``key``. ``rollout_id``: only that
        rollout (the guard's decision on a rollout that ended meanwhile is dropped)."""
        control = self.control
        for _ in range(COMMIT_ATTEMPTS):
            state = control._read()
            current = control._sync(state)
            entry = state.domains.get(key)
            rollout = Rollout.from_dict(entry.rollout if entry else None)
            if entry is None or rollout is None or not rollout.running:
                raise (Conflict if rollout is not None else NotFound)(
                    f"{key[0]}/{key[1]} has no running rollout"
                    + (f" (its last one was {rollout.state})" if rollout else ""),
                )
            if rollout_id is not None and rollout.id != rollout_id:
                raise Conflict("the rollout changed meanwhile")
            done = replace(
                rollout,
                state=PROMOTED if decision == "promote" else ABORTED,
                decided_at=time.time(),
                decided_by=by,
                reason=reason,
            )
            active = rollout.version if decision == "promote" else entry.active
            new = state.with_entry(key, replace(entry, active=active, rollout=done.to_dict()))
            if decision == "promote":
                snapshot = control._build(current, new, control.desired(new))
                if snapshot.adapters.get(key) != control.desired(new).get(key):
                    raise Conflict(f"v{rollout.version} cannot be loaded (see logs)")
            else:
                snapshot = current.with_registry_version(new.version)
            try:
                control._commit(
                    state, new, snapshot, None,
                    {"action": decision, "division": key[0], "domain": key[1]},
                )  # fmt: skip
            except RegistryConflict:
                continue
            control.metrics.rollout_decisions.labels(decision, by).inc()
            log.warning(
                "rollout %s/%s v%d %s by %s%s", key[0], key[1], rollout.version, done.state, by,
                f": {reason}" if reason else "",
            )  # fmt: skip
            return self.describe(key)
        raise Unavailable("the registry kept changing under this change; retry")

    def describe(self, key: DomainKey) -> dict[str, Any]:
        """The rollout of ``key`` as the registry holds it, and what this replica serves."""
        control = self.control
        snap = control.current
        rollout = rollout_of(control.known_state, key)
        if rollout is None:
            if key not in snap.adapters:
                raise NotFound(f"no adapter for {key[0]}/{key[1]}")
            raise NotFound(f"{key[0]}/{key[1]} has had no rollout")
        canary = snap.canaries.get(key)
        served = snap.adapters.get(key)
        return {
            "division": key[0],
            "domain": key[1],
            **rollout.to_dict(),
            "active_version": served.version if served else None,
            "serving_canary": canary is not None and canary.rollout_id == rollout.id,
            "registry_version": control.known_state.version,
        }

    def listing(self) -> list[dict[str, Any]]:
        state = self.control.known_state
        return [self.describe(k) for k in sorted(state.domains) if rollout_of(state, k) is not None]


def _probe(snapshot: Snapshot, key: DomainKey, canary: Canary) -> str | None:
    """The registration probe (finite scores), on the canary's internal domain."""
    rows = synthetic_rows(snapshot.serving_model, PROBE_ROWS, seed=1)
    rows.sparse[:4] = 0
    rows.domains[:, snapshot.divisions.index(key[0])] = canary.domain_id
    probs = np.asarray(runner_of(snapshot).score(rows), dtype=np.float64)
    bad = int((~np.isfinite(probs)).sum())
    return f"its scores are not finite for {bad} of {len(probs)} probe rows" if bad else None


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Served:
    """Which arm of a running rollout answered one request (what feedback is joined to)."""

    key: DomainKey
    rollout_id: str
    arm: str  # "canary" or "stable"
    version: int


def route(
    snapshot: Snapshot,
    names: Mapping[str, str],
    domains: Any,
    versions: dict[str, int],
    user_id: Any,
) -> Served | None:
    """Send a request to its user's arm of a running rollout: rewrites the domain ids of
    ``domains`` (rows x divisions) and ``versions`` for canary users; None outside rollouts."""
    for i, div in enumerate(snapshot.divisions):
        key = (div, names.get(div, ""))
        canary = snapshot.canaries.get(key)
        if canary is None:
            continue
        if in_canary(canary, user_id):
            domains[:, i] = canary.domain_id
            versions[div] = canary.loaded.version
            return Served(key, canary.rollout_id, "canary", canary.loaded.version)
        return Served(key, canary.rollout_id, "stable", versions[div])
    return None
