"""The control plane: registry changes become new snapshots, built off the request path.

Every change (an admin registration, rollback or removal, or a reconcile after another
replica's change) runs on ONE builder thread, in this order:

1. validate (package parse, fit against the loaded model, rank cap, names);
2. build the new snapshot from the current one (copy-on-write) and warm it up;
3. commit the new registry state (compare-and-set; a concurrent writer means re-read and redo);
4. swap the serving reference.

A failure in 1-3 leaves the serving snapshot and the registry as they were.

A registry that went backwards (a Redis that lost its data) is never followed: see
:mod:`mdlora.service.recovery` (the packages this replica loaded are kept, byte for byte, for that).

Removing a domain: a domain registered after training is removed (requests for it then
follow ``MDLORA_UNKNOWN_DOMAIN``). A domain the artifact was trained with cannot lose its
trained adapter: removing it drops its registered versions and it serves its artifact version
again; when it already does, the removal is refused (a conflict).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mdlora.formats.adapter_package import (
    AdapterPackage,
    check_adapter_fits,
    parse_adapter_package,
)
from mdlora.formats.files import (
    ArtifactError,
    error_text,
    package_digest,
)
from mdlora.models.state import TensorMismatchError, gate_scope_conflict
from mdlora.service.errors import Conflict, NotFound, Refused, ServiceError, TooLarge, Unavailable
from mdlora.service.metrics import ServiceMetrics
from mdlora.service.recovery import HeldPackages, Recovery, RegistryDiverged
from mdlora.service.registry import (
    DomainKey,
    RegistryConflict,
    RegistryError,
    RegistryState,
    RegistryStore,
    RegistryUnavailable,
    VersionRecord,
    check_name,
    new_record,
    next_version,
    set_active,
)
from mdlora.service.rollout import Rollouts, attach
from mdlora.service.runtime import probe_problem
from mdlora.service.snapshot import ArtifactBase, LoadedAdapter, Snapshot, SnapshotHolder
from mdlora.service.views import describe_domain, registration_warnings

log = logging.getLogger("mdlora.service")
T = TypeVar("T")
E = TypeVar("E", bound=ServiceError)
COMMIT_ATTEMPTS = 5


class ControlPlane:
    """Owns the registry store and the snapshot holder; see the module docstring."""

    def __init__(
        self,
        base: ArtifactBase,
        store: RegistryStore,
        prepare: Callable[[Snapshot], None],
        metrics: ServiceMetrics,
        max_adapter_bytes: int,
        reconcile_interval_s: float = 10.0,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self.base, self.store, self.prepare, self.metrics = base, store, prepare, metrics
        self.max_adapter_bytes = max_adapter_bytes
        self.reconcile_interval_s = reconcile_interval_s
        initial = base.snapshot(0)
        prepare(initial)
        self.holder = SnapshotHolder(initial)
        self.registry_error: str | None = None
        self.known_state = RegistryState()
        # domains the registry asks for that the serving snapshot lacks: key -> why
        self.unloaded: dict[DomainKey, str] = {}
        self._load_errors: dict[DomainKey, str] = {}
        self.held = HeldPackages()  # parsed, with their bytes (to write a lost registry back)
        self.recovery = Recovery(store, metrics, self.held.raw)
        self.rollouts = Rollouts(self)  # canary rollouts (service.rollout)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, "mdlora-builder", initializer=thread_init
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pending = threading.Lock()
        self._reconcile_queued = False
        metrics.track_snapshot(lambda: self.holder.current.created_at)
        metrics.registry_version.set(0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Reconcile once (serving the artifact as is if the registry is down), then keep
        listening for changes and reconciling every ``reconcile_interval_s``."""
        self._call(self._reconcile)
        for target, name in ((self._listen, "listener"), (self._periodic, "reconciler")):
            t = threading.Thread(target=target, name=f"mdlora-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    @property
    def current(self) -> Snapshot:
        return self.holder.current

    @property
    def registry_ok(self) -> bool:
        return self.registry_error is None and self.recovery.problem is None

    @property
    def registry_status(self) -> str:
        """``ok``, or why the registry is not followed (readiness, listings)."""
        if self.registry_error is not None:
            return f"unavailable: {self.registry_error}"
        if self.recovery.problem is not None:
            return f"behind this replica: {self.recovery.problem}"
        return "ok"

    def _mark(self, error: BaseException | None) -> None:
        if error is None:
            if self.registry_error is not None:
                log.info("registry reachable again")
            self.registry_error = None
            self.metrics.registry_up.set(1)
        else:
            if self.registry_error is None:
                log.warning("registry unavailable: %s", error)
            self.registry_error = str(error)
            self.metrics.registry_up.set(0)

    def check_registry(self) -> bool:
        """Ping the store now (readiness); updates :attr:`registry_ok`."""
        try:
            self.store.ping()
        except RegistryUnavailable as exc:
            self._mark(exc)
            return False
        if self.registry_error is not None or self.recovery.problem is not None:
            self.request_reconcile()  # back: catch up at once
        self._mark(None)
        return self.registry_ok

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return self._executor.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the builder thread and await it."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    # ------------------------------------------------------------------ reconcile
    def _listen(self) -> None:
        self.store.listen(self.request_reconcile, self._mark, self._stop)

    def _periodic(self) -> None:
        while not self._stop.wait(self.reconcile_interval_s):
            self.request_reconcile()

    def request_reconcile(self) -> None:
        """Queue one reconcile on the builder thread (coalesced with one already queued)."""
        with self._pending:
            if self._reconcile_queued or self._stop.is_set():
                return
            self._reconcile_queued = True
        with contextlib.suppress(RuntimeError):  # the executor is shut down: stopping
            self._executor.submit(self._reconcile_job)

    def _reconcile_job(self) -> None:
        with self._pending:
            self._reconcile_queued = False
        self._reconcile()

    def _reconcile(self) -> bool:
        """Bring the serving snapshot to the store's state; False if the store is down."""
        try:
            state = self.store.read_state()
        except RegistryUnavailable as exc:
            self._mark(exc)
            return False
        except RegistryError as exc:
            log.error("registry state unreadable, keeping the current snapshot: %s", exc)
            self.metrics.adapter_loads.labels("error").inc()
            return False
        self._mark(None)
        try:
            state = self.recovery.follow(self.known_state, state)
        except RegistryUnavailable as exc:
            self._mark(exc)
            return False
        except RegistryDiverged:
            self._retry_soon()
            return False
        self._sync(state)
        return True

    def _retry_soon(self) -> None:
        """Reconcile again shortly (another replica may be writing the registry back)."""
        timer = threading.Timer(min(1.0, self.reconcile_interval_s), self.request_reconcile)
        timer.daemon = True
        timer.start()

    def desired(self, state: RegistryState) -> dict[DomainKey, LoadedAdapter]:
        """Which version of which domain ``state`` asks for, the artifact's included."""
        out = dict(self.base.adapters)
        for key, entry in state.domains.items():
            record = entry.record(entry.active)
            if record is not None:
                out[key] = LoadedAdapter(record.version, record.sha256, "registry")
            elif key not in self.base.adapters:
                out.pop(key, None)
        return out

    def _sync(self, state: RegistryState) -> Snapshot:
        """Swap in a snapshot reflecting ``state`` (if the serving one does not)."""
        current = self.holder.current
        self.known_state = state
        target = self.desired(state)
        if dict(current.adapters) == target:
            snapshot = current
            if current.registry_version != state.version:
                snapshot = current.with_registry_version(state.version)
            snapshot = attach(self, snapshot, state)  # the canaries it runs
            if snapshot is not current:
                self._swap(snapshot)
            self._note_unloaded()
            return self.holder.current
        snapshot = self._build(current, state, target)
        self._swap(snapshot)
        self._note_unloaded()
        return snapshot

    def _note_unloaded(self) -> None:
        """Record which registered versions the serving snapshot could not load (readiness)."""
        served = self.holder.current.adapters
        self.unloaded = {
            k: self._load_errors.get(k, "not loaded")
            for k, v in self.desired(self.known_state).items()
            if served.get(k) != v
        }
        self._load_errors = {k: v for k, v in self._load_errors.items() if k in self.unloaded}

    def _build(
        self, current: Snapshot, state: RegistryState, target: dict[DomainKey, LoadedAdapter]
    ) -> Snapshot:
        """A snapshot serving ``target`` (versions that cannot be loaded are skipped, logged)."""
        if set(current.adapters) - set(target):
            start = self.base.snapshot(state.version)  # a domain left: rebuild from the artifact
        else:
            start = current
        changes = sorted(k for k, v in target.items() if start.adapters.get(k) != v)
        packages = []
        for key in changes:
            try:
                packages.append((self._package(key, target[key], state), target[key]))
            except (RegistryError, ArtifactError) as exc:
                log.error("cannot load adapter %s/%s: %s", key[0], key[1], exc)
                self._load_errors[key] = f"v{target[key].version}: {exc}"
                self.metrics.adapter_loads.labels("error").inc()
        loaded = len(packages)
        try:
            snapshot = start.with_adapters(packages, state.version)
        except (ArtifactError, TensorMismatchError, ValueError, KeyError):
            snapshot = start  # one of them does not fit: load them one at a time
            for pkg in packages:
                try:
                    snapshot = snapshot.with_adapters([pkg], state.version)
                except (ArtifactError, TensorMismatchError, ValueError, KeyError) as exc:
                    log.error("adapter %s/%s refused: %s", pkg[0].division, pkg[0].domain, exc)
                    self._load_errors[(pkg[0].division, pkg[0].domain)] = (
                        f"v{pkg[1].version}: {error_text(exc)}"
                    )
                    self.metrics.adapter_loads.labels("error").inc()
                    loaded -= 1
            if snapshot is start:
                snapshot = start.with_adapters([], state.version)
        snapshot = attach(self, snapshot, state)  # the canaries it runs (prepared)
        if snapshot.runner is None:
            self.prepare(snapshot)
        if loaded:
            self.metrics.adapter_loads.labels("ok").inc(loaded)
        return snapshot

    def _package(
        self, key: DomainKey, loaded: LoadedAdapter, state: RegistryState
    ) -> AdapterPackage:
        if loaded.origin == "artifact":
            return self.base.artifact_package(*key)
        entry = state.domains.get(key)
        record = entry.record(loaded.version) if entry else None
        if record is None:
            raise RegistryError(f"{key[0]}/{key[1]}: version {loaded.version} not listed")
        pkg = self.held.parsed(key, record)
        if pkg is None:
            config, weights = self.store.fetch(key, record)
            pkg = parse_adapter_package(config, weights, self.max_adapter_bytes)
            self._remember(pkg, key, record, config, weights)
        if (pkg.division, pkg.domain) != key:
            raise RegistryError(f"package for {pkg.division}/{pkg.domain} stored under {key}")
        return pkg

    def _remember(
        self, pkg: AdapterPackage, key: DomainKey, record: VersionRecord, *raw: bytes
    ) -> None:
        self.held.add(pkg, key, record, raw[0], raw[1], self.known_state)

    def _swap(self, snapshot: Snapshot) -> None:
        self.holder.swap(snapshot)
        self.metrics.registry_version.set(snapshot.registry_version)

    # ------------------------------------------------------------------ admin writes
    def _read(self) -> RegistryState:
        try:
            state = self.store.read_state()
        except RegistryUnavailable as exc:
            self._mark(exc)
            raise Unavailable(f"the registry is unavailable, nothing was changed: {exc}") from None
        except RegistryError as exc:
            raise Unavailable(str(exc)) from None
        self._mark(None)
        try:
            return self.recovery.follow(self.known_state, state)
        except RegistryUnavailable as exc:
            self._mark(exc)
            raise Unavailable(f"the registry is unavailable, nothing was changed: {exc}") from None
        except RegistryDiverged as exc:
            self._retry_soon()
            raise Unavailable(f"nothing was changed: {exc}") from None

    def _commit(
        self,
        state: RegistryState,
        new: RegistryState,
        snapshot: Snapshot,
        package: Any = None,
        event: dict[str, Any] | None = None,
    ) -> None:
        snapshot = attach(self, snapshot, new)  # the canaries it runs (prepared)
        try:
            self.store.commit(state.version, new, package, event)
        except RegistryUnavailable as exc:
            self._mark(exc)
            raise Unavailable(f"the registry is unavailable, nothing was changed: {exc}") from None
        self.known_state = new
        self._swap(snapshot)
        self._note_unloaded()

    def _probe(self, snapshot: Snapshot, key: DomainKey) -> str | None:
        """What is wrong with ``snapshot``'s scores in ``key`` (None: finite probabilities)."""
        return probe_problem(snapshot, *key)

    def _refuse(self, error: E) -> E:
        """``error``, counted as a refused adapter load."""
        self.metrics.adapter_loads.labels("refused").inc()
        return error

    def register(
        self, config: bytes, weights: bytes, canary_percent: float | None = None
    ) -> dict[str, Any]:
        """Validate and register one adapter package (runs on the builder thread);
        ``canary_percent``: as a canary rollout beside the active version (service.rollout)."""
        if len(weights) > self.max_adapter_bytes:
            raise self._refuse(
                TooLarge(
                    f"adapter_model.safetensors is {len(weights)} bytes, over the "
                    f"{self.max_adapter_bytes}-byte limit (MDLORA_MAX_ADAPTER_BYTES)"
                )
            )
        try:
            pkg = parse_adapter_package(config, weights, self.max_adapter_bytes)
            key = (check_name("division", pkg.division), check_name("domain", pkg.domain))
            model = self.holder.current.model
            check_adapter_fits(model, pkg, self.base.max_rank, self.base.backbone_sha256)
            scope = pkg.config.get("gate_scope")
            conflict = gate_scope_conflict(model, key[0], key[1], scope)
            if conflict:
                raise ArtifactError(conflict)
        except ArtifactError as exc:
            raise self._refuse(Refused(f"adapter refused: {exc}")) from None
        digest = package_digest(config, weights)
        for _ in range(COMMIT_ATTEMPTS):
            state = self._read()
            current = self._sync(state)
            entry = state.domains.get(key)
            active = entry.record(entry.active) if entry else None
            if (
                active is not None
                and active.package == digest
                and current.adapters.get(key)
                == LoadedAdapter(active.version, active.sha256, "registry")
            ):  # the same package again (a retried upload): nothing to change
                return {
                    "division": key[0],
                    "domain": key[1],
                    "action": "unchanged",
                    "version": active.version,
                    "origin": "registry",
                    "sha256": active.sha256,
                    "new_domain": False,
                    "registry_version": state.version,
                }
            artifact = self.base.adapters.get(key)
            record = new_record(
                next_version(state, key, artifact.version if artifact else None), config, weights
            )
            self._remember(pkg, key, record, config, weights)
            loaded = LoadedAdapter(record.version, record.sha256, "registry")
            new_domain = key[1] not in current.domain_ids.get(key[0], {})
            try:
                snapshot = current.with_adapters([(pkg, loaded)], state.version + 1)
            except (ArtifactError, TensorMismatchError, ValueError, KeyError) as exc:
                raise self._refuse(Refused(f"adapter refused: {error_text(exc)}")) from None
            self.prepare(snapshot)
            problem = self._probe(snapshot, key)
            if problem:
                raise self._refuse(Refused(f"adapter refused: {problem}"))
            if canary_percent is None:
                self.rollouts.refuse_change(state, key, "registration")
                new = state.with_entry(
                    key, set_active(state.domains.get(key), record.version, record)
                )
            else:  # the active version stays; the new one serves a share of the users
                new = self.rollouts.register_as_canary(
                    state, current, key, pkg, record, canary_percent
                )
                snapshot = current.with_registry_version(new.version)
            try:
                self._commit(
                    state,
                    new,
                    snapshot,
                    (key, record, config, weights),
                    {"action": "register", "division": key[0], "domain": key[1]},
                )
            except RegistryConflict:
                continue
            self.metrics.adapter_loads.labels("ok").inc()
            log.info("registered %s/%s v%d", key[0], key[1], record.version)
            warnings = registration_warnings(pkg.config, current.gate_sharers(key), key)
            for w in warnings:
                log.warning("%s/%s v%d: %s", key[0], key[1], record.version, w)
            return {
                "warnings": warnings,
                "division": key[0],
                "domain": key[1],
                "action": "register",
                "version": record.version,
                "origin": "registry",
                "sha256": record.sha256,
                "new_domain": new_domain,
                "registry_version": new.version,
            }
        raise Unavailable("the registry kept changing under this registration; retry")

    def _change(self, key: DomainKey, action: str) -> dict[str, Any]:
        """Rollback or removal of ``key`` (runs on the builder thread)."""
        for _ in range(COMMIT_ATTEMPTS):
            state = self._read()
            current = self._sync(state)
            if key not in current.adapters:
                if key in state.domains:  # removed: its versions stay listed (GET)
                    raise NotFound(
                        f"{key[0]}/{key[1]} is not served (it was removed); its versions stay "
                        "listed: register a package to serve it again"
                    )
                raise NotFound(
                    f"no adapter for {key[0]}/{key[1]}; known: "
                    f"{sorted('/'.join(k) for k in current.adapters)}",
                )
            self.rollouts.refuse_change(state, key, action)
            entry = state.domains.get(key)
            artifact = self.base.adapters.get(key)
            active = entry.active if entry else None
            if action == "rollback":
                if active is None:
                    raise Conflict(
                        f"{key[0]}/{key[1]} serves its artifact version "
                        f"{artifact.version if artifact else '?'}: nothing to roll "
                        "back to",
                    )
                assert entry is not None
                older = [r.version for r in entry.versions if r.version < active]
                if not older and artifact is None:
                    raise Conflict(
                        f"{key[0]}/{key[1]} has a single version; remove it with DELETE instead",
                    )
                target: int | None = max(older) if older else None
            else:
                if active is None:
                    raise Conflict(
                        f"{key[0]}/{key[1]} was trained with the artifact and "
                        "serves that version; its trained adapter cannot be removed",
                    )
                target = None
            assert entry is not None
            new = state.with_entry(key, set_active(entry, target))
            want = self.desired(new)
            snapshot = self._build(current, new, want)
            if key in want and snapshot.adapters.get(key) != want[key]:
                raise Conflict(
                    f"{key[0]}/{key[1]} cannot go back to v{want[key].version}: "
                    f"{self._load_errors.pop(key, 'its package cannot be loaded')}",
                )
            try:
                self._commit(
                    state,
                    new,
                    snapshot,
                    None,
                    {"action": action, "division": key[0], "domain": key[1]},
                )
            except RegistryConflict:
                continue
            served = snapshot.adapters.get(key)
            log.info("%s %s/%s -> %s", action, key[0], key[1], served)
            return {
                "division": key[0],
                "domain": key[1],
                "action": action,
                "version": served.version if served else None,
                "origin": served.origin if served else None,
                "registry_version": new.version,
            }
        raise Unavailable("the registry kept changing under this change; retry")

    def rollback(self, division: str, domain: str) -> dict[str, Any]:
        return self._change((division, domain), "rollback")

    def remove(self, division: str, domain: str) -> dict[str, Any]:
        return self._change((division, domain), "remove")

    # ------------------------------------------------------------------ reads
    def listing(self) -> list[dict[str, Any]]:
        """Every domain with an adapter (served or registered), with its versions."""
        snap, state = self.holder.current, self.known_state
        keys = set(snap.adapters) | set(state.domains)
        return [self.describe(k) for k in sorted(keys)]

    def describe(self, key: DomainKey) -> dict[str, Any]:
        """One domain's served version and every version it has had (``views``)."""
        return describe_domain(
            self.holder.current, self.known_state, self.base.adapters.get(key), key
        )
