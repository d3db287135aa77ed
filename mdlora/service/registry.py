"""The adapter registry: versioned adapter packages on top of the artifact, two stores.

What the registry holds is an *overlay* on the artifact: for every domain that was registered
(or rolled back, or removed) after training, its registered versions and which one is active.
A domain the registry does not mention serves the version the artifact was trained with.

* ``active`` is a registered version, or None: a domain of the artifact then serves its
  artifact version again, a domain added later is gone.
* Versions are never reused: a new registration gets one more than any version the domain
  ever had (the artifact's included).
* ``RegistryState.version`` counts changes; replicas compare it to know when to reconcile.
* ``RegistryState.epoch``: a random id written with the first change. A store that lost its
  data (a Redis restarted without persistence, flushed, failed over to an empty replica) has
  no state, hence no epoch: replicas notice that the registry went backwards and write back
  what they hold (:mod:`mdlora.service.recovery`) instead of following it.

Stores (one interface, :class:`RegistryStore`):

* :class:`LocalRegistry` (embedded default): packages under
  ``<artifact>/adapters/<division>/<domain>/<version>/`` and the state in
  ``<artifact>/registry.json``, written atomically under a file lock.
* :class:`RedisRegistry`: the state as one JSON value (compare-and-set with WATCH/MULTI),
  packages as content-addressed hashes, and a pub/sub channel on which every change is
  announced; keys live under ``<prefix>:registry:<model id>`` so registries of different
  models never mix. A missed message is caught by the periodic reconcile.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mdlora.formats.artifact import adapter_dir
from mdlora.formats.fileio import atomic_write
from mdlora.formats.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    REGISTRY,
    ArtifactError,
    package_digest,
    sha256_bytes,
)

log = logging.getLogger("mdlora.service")

DomainKey = tuple[str, str]
REGISTRY_FILE = REGISTRY
STATE_FORMAT = "mdlora-registry"
RESTORE_LOCK_MS = 10_000  # how long one replica may hold the restore lock


def new_epoch() -> str:
    return uuid.uuid4().hex


class RegistryError(RuntimeError):
    """A registry operation failed; the message says why."""


class RegistryUnavailable(RegistryError):
    """The store cannot be reached or written (refused as unavailable; serving continues)."""


class RegistryConflict(RegistryError):
    """The state changed under a compare-and-set; the caller re-reads and retries."""


@dataclass(frozen=True)
class VersionRecord:
    """One registered version of a domain's adapter."""

    version: int
    sha256: str  # of adapter_model.safetensors
    size: int
    created_at: float
    package: str = ""  # package_digest(config, weights); "" in states written before it existed

    @property
    def blob_id(self) -> str:
        """What the package is stored under: its whole-package digest (weights alone: legacy)."""
        return self.package or self.sha256

    def check(self, key: DomainKey, config: bytes, weights: bytes) -> None:
        """Refuse fetched bytes that are not the package this record registered."""
        if sha256_bytes(weights) != self.sha256 or (
            self.package and package_digest(config, weights) != self.package
        ):
            raise RegistryError(
                f"{key[0]}/{key[1]} v{self.version}: the stored package does not match "
                "its registered checksum"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "created_at": self.created_at,
        }
        if self.package:
            out["package"] = self.package
        return out

    def view(self) -> dict[str, Any]:
        """The version as the admin API lists it."""
        return {
            "version": self.version, "origin": "registry", "sha256": self.sha256,
            "package_sha256": self.package or None, "size": self.size,
            "created_at": self.created_at,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VersionRecord:
        return cls(
            int(d["version"]),
            str(d["sha256"]),
            int(d["size"]),
            float(d["created_at"]),
            str(d.get("package") or ""),
        )


#: a package to store: where, which version, its adapter_config.json and safetensors bytes
Package = tuple[DomainKey, VersionRecord, bytes, bytes]


@dataclass(frozen=True)
class DomainEntry:
    """A domain's registered versions (oldest first) and the active one (None: see module)."""

    active: int | None
    versions: tuple[VersionRecord, ...] = ()
    #: the domain's canary rollout, running or decided (service.rollout.Rollout), as JSON
    rollout: Mapping[str, Any] | None = None

    def record(self, version: int | None) -> VersionRecord | None:
        return next((r for r in self.versions if r.version == version), None)


@dataclass(frozen=True)
class RegistryState:
    """The whole overlay; small (metadata only), read and written as one value."""

    version: int = 0
    domains: Mapping[DomainKey, DomainEntry] = field(default_factory=dict)
    epoch: str = ""  # see the module docstring; "" in an empty store (or an old state)

    @property
    def empty(self) -> bool:
        return self.version == 0 and not self.domains

    def with_entry(self, key: DomainKey, entry: DomainEntry) -> RegistryState:
        domains = dict(self.domains)
        domains[key] = entry
        return RegistryState(self.version + 1, domains, self.epoch or new_epoch())

    def records(self) -> Iterator[tuple[DomainKey, VersionRecord]]:
        """Every version record of every domain."""
        for key, entry in sorted(self.domains.items()):
            for record in entry.versions:
                yield key, record

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "version": self.version,
                "epoch": self.epoch,
                "domains": [
                    {
                        "division": k[0],
                        "domain": k[1],
                        "active": e.active,
                        "versions": [r.to_dict() for r in e.versions],
                        **({"rollout": dict(e.rollout)} if e.rollout is not None else {}),
                    }
                    for k, e in sorted(self.domains.items())
                ],
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str | None) -> RegistryState:
        if not data:
            return cls()
        try:
            d = json.loads(data)
            if d.get("format") != STATE_FORMAT:
                raise ValueError("format field")
            domains = {
                (str(e["division"]), str(e["domain"])): DomainEntry(
                    None if e["active"] is None else int(e["active"]),
                    tuple(VersionRecord.from_dict(r) for r in e["versions"]),
                    _rollout(e.get("rollout")),
                )
                for e in d["domains"]
            }
            return cls(int(d["version"]), domains, str(d.get("epoch") or ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"the registry state is not readable ({exc})") from None


def _rollout(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("a domain's rollout is not an object")
    return value


def next_version(state: RegistryState, key: DomainKey, artifact_version: int | None) -> int:
    """One more than any version ``key`` ever had."""
    entry = state.domains.get(key)
    used = [artifact_version or 0, *(r.version for r in (entry.versions if entry else ()))]
    return max(used) + 1


class RegistryStore(ABC):
    """Where the overlay and the packages live (see the module docstring)."""

    kind: str

    @abstractmethod
    def read_state(self) -> RegistryState: ...

    @abstractmethod
    def commit(
        self,
        expected_version: int,
        state: RegistryState,
        package: tuple[DomainKey, VersionRecord, bytes, bytes] | None = None,
        event: Mapping[str, Any] | None = None,
    ) -> None:
        """Store ``package`` (if any) and replace the state, if it is still at
        ``expected_version`` (else :class:`RegistryConflict`)."""

    @abstractmethod
    def fetch(self, key: DomainKey, record: VersionRecord) -> tuple[bytes, bytes]:
        """``(adapter_config.json, adapter_model.safetensors)`` bytes of one version."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`RegistryUnavailable` when the store cannot be used."""

    @abstractmethod
    def has_package(self, key: DomainKey, record: VersionRecord) -> bool:
        """Whether the package of ``record`` is stored."""

    @abstractmethod
    def put_package(self, package: Package) -> None:
        """Store one package (content-addressed: writing it twice is harmless)."""

    @contextlib.contextmanager
    def restore_lock(self, owner: str) -> Iterator[None]:
        """Held by the one replica writing a lost registry back (else :class:`RegistryConflict`)."""
        yield

    def restore(
        self, expected_version: int, state: RegistryState, packages: Sequence[Package], owner: str
    ) -> int:
        """Write back a registry that lost its data: the ``packages`` it lacks (every replica
        may add its own), then, under the restore lock, ``state`` if the store is still at
        ``expected_version`` (else :class:`RegistryConflict`). Returns how many packages were
        written."""
        written = 0
        for package in packages:
            if not self.has_package(package[0], package[1]):
                self.put_package(package)
                written += 1
        with self.restore_lock(owner):
            self.commit(expected_version, state, None, {"action": "restore"})
        return written

    def listen(
        self,
        on_change: Callable[[], None],
        on_error: Callable[[BaseException], None],
        stop: threading.Event,
    ) -> None:
        """Block until ``stop``, calling ``on_change`` whenever another writer may have changed
        the state (and after every (re)connection). Stores without notifications return."""
        return None

    def close(self) -> None:
        """Release connections."""
        return None


# ------------------------------------------------------------------------------------ local
def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, data, durable=True)


class LocalRegistry(RegistryStore):
    """The registry in the artifact directory itself: no server, one host."""

    kind = "local"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.path = self.root / REGISTRY_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fh = open(self.root / ".registry.lock", "a+b")  # noqa: SIM115 - held for the block
        except OSError as exc:
            raise RegistryUnavailable(
                f"cannot write the registry in {self.root} ({exc.strerror}); the artifact "
                "directory must be writable for MDLORA_REGISTRY=local (or use redis)"
            ) from None
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_state(self) -> RegistryState:
        try:
            return RegistryState.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return RegistryState()
        except OSError as exc:
            raise RegistryUnavailable(f"cannot read {self.path} ({exc.strerror})") from None

    def commit(
        self,
        expected_version: int,
        state: RegistryState,
        package: tuple[DomainKey, VersionRecord, bytes, bytes] | None = None,
        event: Mapping[str, Any] | None = None,
    ) -> None:
        with self._locked():
            if self.read_state().version != expected_version:
                raise RegistryConflict("the registry changed meanwhile")
            written: Path | None = None
            try:
                if package is not None:
                    (div, dom), record, config, weights = package
                    target = adapter_dir(self.root, div, dom, record.version)
                    if target.exists():  # a leftover of a commit that failed half-way
                        shutil.rmtree(target)
                    target.mkdir(parents=True)
                    written = target
                    _atomic_write(target / ADAPTER_WEIGHTS, weights)
                    _atomic_write(target / ADAPTER_CONFIG, config)
                _atomic_write(self.path, state.to_json())
            except OSError as exc:
                if written is not None:
                    shutil.rmtree(written, ignore_errors=True)
                raise RegistryUnavailable(
                    f"cannot write the registry in {self.root} ({exc.strerror}); the artifact "
                    "directory must be writable for MDLORA_REGISTRY=local (or use redis)"
                ) from None

    def fetch(self, key: DomainKey, record: VersionRecord) -> tuple[bytes, bytes]:
        d = adapter_dir(self.root, key[0], key[1], record.version)
        try:
            config, weights = (d / ADAPTER_CONFIG).read_bytes(), (d / ADAPTER_WEIGHTS).read_bytes()
        except OSError as exc:
            raise RegistryError(f"{d}: adapter package unreadable ({exc.strerror})") from None
        record.check(key, config, weights)
        return config, weights

    def ping(self) -> None:
        if not self.root.is_dir():
            raise RegistryUnavailable(f"the artifact directory {self.root} is gone")

    def has_package(self, key: DomainKey, record: VersionRecord) -> bool:
        try:
            self.fetch(key, record)
        except RegistryError:
            return False
        return True

    def put_package(self, package: Package) -> None:
        (div, dom), record, config, weights = package
        target = adapter_dir(self.root, div, dom, record.version)
        try:
            target.mkdir(parents=True, exist_ok=True)
            _atomic_write(target / ADAPTER_WEIGHTS, weights)
            _atomic_write(target / ADAPTER_CONFIG, config)
        except OSError as exc:
            raise RegistryUnavailable(f"cannot write {target} ({exc.strerror})") from None


# ------------------------------------------------------------------------------------ redis
class RedisRegistry(RegistryStore):
    """The registry in Redis, shared by every replica of one model (see module docstring)."""

    kind = "redis"

    def __init__(self, url: str, prefix: str, model_id: str, timeout: float = 0.5) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=5,
        )
        self.namespace = f"{prefix}:registry:{model_id}"
        self.state_key = f"{self.namespace}:state"
        self.channel = f"{self.namespace}:events"

    def _blob_key(self, sha: str) -> str:
        return f"{self.namespace}:blob:{sha}"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (self._redis.ConnectionError, self._redis.TimeoutError, OSError) as exc:
            raise RegistryUnavailable(f"Redis is unreachable ({exc})") from None

    def read_state(self) -> RegistryState:
        with self._errors():
            return RegistryState.from_json(self.client.get(self.state_key))

    def commit(
        self,
        expected_version: int,
        state: RegistryState,
        package: tuple[DomainKey, VersionRecord, bytes, bytes] | None = None,
        event: Mapping[str, Any] | None = None,
    ) -> None:
        with self._errors():
            if package is not None:
                _, record, config, weights = package
                self.client.hset(
                    self._blob_key(record.blob_id), mapping={"config": config, "weights": weights}
                )
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(self.state_key)
                    if (
                        RegistryState.from_json(pipe.get(self.state_key)).version
                        != expected_version
                    ):
                        raise RegistryConflict("the registry changed meanwhile")
                    pipe.multi()
                    pipe.set(self.state_key, state.to_json())
                    pipe.publish(
                        self.channel, json.dumps({"version": state.version, **(event or {})})
                    )
                    pipe.execute()
                except self._redis.WatchError:
                    raise RegistryConflict("the registry changed meanwhile") from None

    def fetch(self, key: DomainKey, record: VersionRecord) -> tuple[bytes, bytes]:
        with self._errors():
            config, weights = self.client.hmget(
                self._blob_key(record.blob_id), ["config", "weights"]
            )
        if not isinstance(config, bytes) or not isinstance(weights, bytes):
            raise RegistryError(f"{key[0]}/{key[1]} v{record.version}: package missing in Redis")
        record.check(key, bytes(config), bytes(weights))
        return bytes(config), bytes(weights)

    def ping(self) -> None:
        with self._errors():
            self.client.ping()

    def has_package(self, key: DomainKey, record: VersionRecord) -> bool:
        with self._errors():
            return bool(self.client.exists(self._blob_key(record.blob_id)))

    def put_package(self, package: Package) -> None:
        _, record, config, weights = package
        with self._errors():
            self.client.hset(
                self._blob_key(record.blob_id), mapping={"config": config, "weights": weights}
            )

    @contextlib.contextmanager
    def restore_lock(self, owner: str) -> Iterator[None]:
        key = f"{self.namespace}:restore-lock"
        with self._errors():
            if not self.client.set(key, owner, nx=True, px=RESTORE_LOCK_MS):
                raise RegistryConflict("another replica is writing the registry back")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # released only by its owner; else it expires
                self.client.eval(_RELEASE, 1, key, owner)

    def listen(
        self,
        on_change: Callable[[], None],
        on_error: Callable[[BaseException], None],
        stop: threading.Event,
    ) -> None:
        delay = 0.1
        while not stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                delay = 0.1
                on_change()  # (re)connected: catch up with anything missed
                while not stop.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        on_change()
            except (self._redis.ConnectionError, self._redis.TimeoutError, OSError) as exc:
                on_error(exc)
                stop.wait(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


_RELEASE = """if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0"""


def open_store(
    kind: str, artifact_dir: Path, url: str, prefix: str, model_id: str, timeout: float = 0.5
) -> RegistryStore:
    """The store ``kind`` (``local`` or ``redis``)."""
    if kind == "local":
        return LocalRegistry(artifact_dir)
    if kind == "redis":
        return RedisRegistry(url, prefix, model_id, timeout)
    raise ValueError(f"unknown registry {kind!r}; use 'local' or 'redis'")


def check_name(what: str, name: str) -> str:
    """A division or domain name that is safe as a path component and a Redis key part."""
    if not isinstance(name, str) or not name.strip() or len(name) > 128:
        raise ArtifactError(f"{what} name must be 1-128 characters, got {name!r}")
    if name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise ArtifactError(f"{what} name {name!r} may not contain '/', '\\' or control characters")
    return name


def new_record(version: int, config: bytes, weights: bytes) -> VersionRecord:
    return VersionRecord(
        version, sha256_bytes(weights), len(weights), time.time(), package_digest(config, weights)
    )


def set_active(
    entry: DomainEntry | None, active: int | None, add: VersionRecord | None = None
) -> DomainEntry:
    """``entry`` with ``active`` (and ``add`` appended to its versions)."""
    base = entry or DomainEntry(None)
    versions = base.versions + ((add,) if add is not None else ())
    return replace(base, active=active, versions=versions)
