"""A registry that went backwards is noticed, never followed, and written back.

A Redis that restarts without persistence, is flushed, or fails over to an empty replica holds
no registry state: followed as is, every registered adapter would be dropped and version
numbers reused. Each replica remembers the registry it last followed (its state, with every
version record, and the packages it loaded, byte for byte). When the store holds less (no
state, another epoch, a lower change number: :func:`went_back`), the replica keeps serving its
snapshot and writes back what it holds: the packages the store lacks (every replica adds its
own), then the state, with its original version numbers, by one replica under the store's
restore lock (compare-and-set on what it read). Where that cannot be done (the store already
holds another registry's changes) the replica stays on its snapshot, degraded, saying why in
``/readyz`` and ``mdlora_registry_diverged``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from mdlora.formats.adapter_package import AdapterPackage
from mdlora.service.metrics import ServiceMetrics
from mdlora.service.registry import (
    DomainKey,
    Package,
    RegistryConflict,
    RegistryError,
    RegistryState,
    RegistryStore,
    VersionRecord,
    new_epoch,
)

log = logging.getLogger("mdlora.service")
HELD_PACKAGES = 256  # packages kept beyond the active ones (which are always kept)


class HeldPackages:
    """The packages one replica loaded: parsed (no fetch when a version comes back) and byte
    for byte (what a lost registry is written back from). By domain, version and
    whole-package digest; the least recently used beyond :data:`HELD_PACKAGES` go, never one
    that is active."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[str, str, int, str], tuple[AdapterPackage, bytes, bytes]]
        self._items = OrderedDict()

    @staticmethod
    def _key(key: DomainKey, record: VersionRecord) -> tuple[str, str, int, str]:
        return (key[0], key[1], record.version, record.blob_id)

    def add(
        self,
        pkg: AdapterPackage,
        key: DomainKey,
        record: VersionRecord,
        config: bytes,
        weights: bytes,
        state: RegistryState,
    ) -> None:
        k = self._key(key, record)
        self._items[k] = (pkg, config, weights)
        self._items.move_to_end(k)
        if len(self._items) <= HELD_PACKAGES:
            return
        keep = {k}
        for d, entry in state.domains.items():
            active = entry.record(entry.active)
            if active is not None:
                keep.add(self._key(d, active))
        for old in [o for o in self._items if o not in keep]:
            if len(self._items) <= HELD_PACKAGES:
                break
            del self._items[old]

    def parsed(self, key: DomainKey, record: VersionRecord) -> AdapterPackage | None:
        held = self._items.get(self._key(key, record))
        return None if held is None else held[0]

    def raw(self, key: DomainKey, record: VersionRecord) -> tuple[bytes, bytes] | None:
        """``(adapter_config.json, adapter_model.safetensors)`` bytes, if held."""
        held = self._items.get(self._key(key, record))
        return None if held is None else (held[1], held[2])


class RegistryDiverged(RegistryError):
    """The store holds less than this replica has seen and was not written back (yet)."""


def went_back(known: RegistryState, state: RegistryState) -> str | None:
    """Why ``state`` (just read) is behind ``known`` (last followed), or None when it is not."""
    if known.empty:
        return None
    if state.empty:
        return (
            f"the registry is empty, this replica followed change {known.version} (Redis "
            "restarted without its data, flushed or replaced?)"
        )
    if known.epoch and state.epoch != known.epoch:
        return (
            f"the registry was replaced (epoch {known.epoch[:8]}, now {state.epoch[:8] or 'none'})"
        )
    if state.version < known.version:
        return (
            f"the registry went back from change {known.version} to {state.version} "
            "(restored from an older copy?)"
        )
    return None


def restorable(known: RegistryState, state: RegistryState) -> bool:
    """Whether ``known`` can replace ``state``: the store holds nothing ``known`` lacks (it is
    empty, or an older point of the same history)."""
    return state.empty or (state.epoch == known.epoch and state.version < known.version)


class Recovery:
    """One replica's part in recovering a registry that lost its data (module docstring)."""

    def __init__(
        self,
        store: RegistryStore,
        metrics: ServiceMetrics,
        held: Callable[[DomainKey, VersionRecord], tuple[bytes, bytes] | None],
    ) -> None:
        self.store, self.metrics, self.held = store, metrics, held
        self.owner = new_epoch()  # this replica, as the restore lock's holder
        self.problem: str | None = None  # why the registry is behind this replica (degraded)
        metrics.registry_diverged.set(0)

    def follow(self, known: RegistryState, state: RegistryState) -> RegistryState:
        """The state to follow: ``state``, or ``known`` written back when ``state`` went back.

        Raises :class:`RegistryDiverged` (keep serving, degraded) when it was not written back,
        :class:`~service.registry.RegistryUnavailable` when the store failed meanwhile.
        """
        reason = went_back(known, state)
        if reason is None:
            if self.problem is not None:
                log.info("the registry caught up with this replica (change %d)", state.version)
                self._set(None)
            return state
        if self.problem is None:
            self.metrics.registry_losses.inc()
            log.warning("%s: keeping the serving snapshot", reason)
        if not restorable(known, state):
            raise self._diverged(
                f"{reason}; it holds changes this replica did not see, so this replica keeps "
                f"serving change {known.version} and does not follow it: restore the "
                "registry's data, or restart the replicas to serve the registry as it is"
            )
        restored = known if known.epoch else replace(known, epoch=new_epoch())
        packages: list[Package] = []
        lost = []
        for key, record in known.records():
            raw = self.held(key, record)
            if raw is None:
                lost.append(f"{key[0]}/{key[1]} v{record.version}")
            else:
                packages.append((key, record, *raw))
        try:
            written = self.store.restore(state.version, restored, packages, self.owner)
        except RegistryConflict as exc:
            raise self._diverged(
                f"{reason}; not written back yet ({exc}): serving change {known.version} meanwhile"
            ) from None
        self.metrics.registry_restores.inc()
        log.warning(
            "%s: wrote it back (change %d, %d domains, %d packages written%s)",
            reason,
            restored.version,
            len(restored.domains),
            written,
            f"; not held here, listed without their package: {lost}" if lost else "",
        )
        self._set(None)
        return restored

    def _set(self, problem: str | None) -> None:
        self.problem = problem
        self.metrics.registry_diverged.set(0 if problem is None else 1)

    def _diverged(self, message: str) -> RegistryDiverged:
        if message != self.problem:
            log.warning("%s", message)
        self._set(message)
        return RegistryDiverged(message)
