"""Online feedback: what a front end observed, joined to the version and score that served it.

Every predict answer carries a ``request_id``. For a domain with a running rollout
(:mod:`mdlora.service.rollout`) the service remembers, per answer, the rollout arm and version and
the score of each item, for ``MDLORA_FEEDBACK_TTL_S`` (and at most
``MDLORA_FEEDBACK_MAX_REQUESTS`` answers in memory). ``POST /feedback`` takes events
``{request_id, item_id | item_index, clicked}``; each is joined to its answer once (a repeated
event is counted as a duplicate, not twice) and appended to a sliding window of the last
``MDLORA_FEEDBACK_WINDOW`` events of that domain and version, over which :func:`window_stats`
gives counts, mean score, observed CTR, calibration (mean score over CTR), LogLoss and AUC.

A batch is checked whole before anything is recorded: an unknown (or expired) request id, an
item that answer did not score, a wrong type or too many events refuse the batch and
nothing changes.

With Redis (``MDLORA_REGISTRY=redis``) the answers and the windows are shared: any replica
joins feedback for any replica's answer, and the guard sees every replica's events. Answers
are written by a background thread (the predict path only queues them), so feedback can reach
another replica a few milliseconds before its answer does; it is refused then (not found) and can
be sent again.

The guard (:meth:`Feedback.check`): once both versions of a running rollout have
``MDLORA_ROLLOUT_MIN_EVENTS`` events in their windows, a canary whose LogLoss is over the
active version's by more than ``MDLORA_ROLLOUT_LOGLOSS_MARGIN`` (relative), or whose
calibration error ``|calibration - 1|`` is over the active version's by more than
``MDLORA_ROLLOUT_CALIBRATION_MARGIN``, is aborted through the registry (so on every replica),
with the reason in the rollout's status and ``mdlora_rollout_guard_aborts_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from mdlora.formats.encoder import canonical_value
from mdlora.service.errors import NotFound, Refused, ServiceError, Unavailable
from mdlora.service.registry import DomainKey
from mdlora.service.rollout import Rollout, Served, rollout_of
from mdlora.service.schemas import Id

if TYPE_CHECKING:
    from mdlora.service.control import ControlPlane
    from mdlora.service.metrics import ServiceMetrics
    from mdlora.service.settings import ServiceSettings

log = logging.getLogger("mdlora.service")
EPS = 1e-7
WINDOW_STATS = ("count", "mean_score", "ctr", "calibration", "logloss", "auc")


class FeedbackEvent(BaseModel):
    """One observed outcome: the answer (its ``request_id``), the item, clicked or not."""

    model_config = ConfigDict(extra="forbid")
    request_id: Annotated[str, Field(min_length=1, max_length=200)]
    item_id: Id | None = Field(None, description="the item's id, as sent in the predict request")
    item_index: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="the item's position in the predict request (0-based)"
    )
    clicked: StrictBool

    @model_validator(mode="after")
    def _one_item(self) -> FeedbackEvent:
        if (self.item_id is None) == (self.item_index is None):
            raise ValueError("give exactly one of 'item_id' or 'item_index'")
        return self


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEvent] = Field(min_length=1)


@dataclass
class Answer:
    """What one answer of a rollout served (kept for feedback)."""

    served: Served
    raw_items: Sequence[Any]  # the item ids as the request sent them, in request order
    scores: np.ndarray  # float32, one per item
    expires: float
    claimed: set[int] = field(default_factory=set)
    _items: list[str | None] | None = field(default=None, repr=False)

    @property
    def items(self) -> list[str | None]:
        """The canonical item ids, computed when first needed (a feedback join by item id, the
        Redis writer's thread): never on the predict path, where it cost ~0.3 ms an answer."""
        if self._items is None:
            self._items = [canonical_value(i) for i in self.raw_items]
        return self._items

    def to_json(self) -> bytes:
        s = self.served
        return json.dumps(
            {"k": list(s.key), "r": s.rollout_id, "a": s.arm, "v": s.version,
             "i": self.items, "s": [round(float(x), 7) for x in self.scores]}
        ).encode()  # fmt: skip

    @classmethod
    def from_json(cls, data: bytes, expires: float) -> Answer:
        d = json.loads(data)
        served = Served((d["k"][0], d["k"][1]), d["r"], d["a"], int(d["v"]))
        return cls(served, list(d["i"]), np.asarray(d["s"], np.float32), expires)

    def index(self, event: FeedbackEvent) -> int | None:
        if event.item_index is not None:
            return event.item_index if event.item_index < len(self.raw_items) else None
        wanted = canonical_value(event.item_id)
        return next((i for i, v in enumerate(self.items) if v == wanted), None)


class Window:
    """The last ``size`` events of one domain and version (a ring buffer)."""

    def __init__(self, size: int) -> None:
        self.scores = np.zeros(size, np.float32)
        self.clicks = np.zeros(size, bool)
        self.n = 0  # events ever appended

    def append(self, score: float, clicked: bool) -> None:
        i = self.n % len(self.scores)
        self.scores[i], self.clicks[i] = score, clicked
        self.n += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        k = min(self.n, len(self.scores))
        return self.scores[:k], self.clicks[:k]


def window_stats(scores: np.ndarray, clicks: np.ndarray) -> dict[str, Any]:
    """Count, mean score, CTR, calibration, LogLoss and AUC of one window (None: undefined)."""
    n = len(scores)
    out: dict[str, Any] = {k: None for k in WINDOW_STATS}
    out["count"] = n
    if n == 0:
        return out
    p = np.clip(scores.astype(np.float64), EPS, 1 - EPS)
    y = clicks.astype(np.float64)
    out["mean_score"] = float(p.mean())
    out["ctr"] = ctr = float(y.mean())
    out["calibration"] = float(p.mean() / ctr) if ctr > 0 else None
    out["logloss"] = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    pos = int(y.sum())
    if 0 < pos < n:  # Mann-Whitney with average ranks for ties
        _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
        ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based
        out["auc"] = float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))
    return out


def guard_verdict(
    canary: dict[str, Any], stable: dict[str, Any], settings: ServiceSettings
) -> tuple[str, str] | None:
    """``(check, reason)`` when the canary does worse than the active version, else None."""
    need = settings.rollout_min_events
    if canary["count"] < need or stable["count"] < need:
        return None
    lc, ls = canary["logloss"], stable["logloss"]
    limit = ls * (1 + settings.rollout_logloss_margin)
    if lc > limit:
        return "logloss", (
            f"LogLoss {lc:.4f} over {canary['count']} events, against {ls:.4f} for the active "
            f"version ({stable['count']} events): more than the allowed "
            f"{settings.rollout_logloss_margin:.0%} worse (MDLORA_ROLLOUT_LOGLOSS_MARGIN)"
        )
    cc, cs = canary["calibration"], stable["calibration"]
    err_c = math.inf if cc is None else abs(cc - 1)
    err_s = math.inf if cs is None else abs(cs - 1)
    if err_c > err_s + settings.rollout_calibration_margin:
        return "calibration", (
            f"calibration (mean score / CTR) {cc if cc is None else round(cc, 4)} over "
            f"{canary['count']} events, against {cs if cs is None else round(cs, 4)} for the "
            f"active version: off by more than the allowed "
            f"{settings.rollout_calibration_margin} (MDLORA_ROLLOUT_CALIBRATION_MARGIN)"
        )
    return None


class Feedback:
    """Remembered answers, feedback windows and the guard (see the module docstring)."""

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        control: ControlPlane,
        redis_client: Any = None,
        namespace: str = "",
    ) -> None:
        self.settings, self.metrics, self.control = settings, metrics, control
        self.answers: OrderedDict[str, Answer] = OrderedDict()
        self.windows: dict[tuple[DomainKey, int], Window] = {}
        self.redis, self.ns = redis_client, namespace
        self._checked: dict[DomainKey, float] = {}
        self._queue: queue.SimpleQueue[tuple[str, Answer] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        if redis_client is not None:
            self._writer = threading.Thread(target=self._write, name="mdlora-feedback", daemon=True)
            self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=5)
            self._writer = None

    # ------------------------------------------------------------------ predict path
    def remember(
        self, request_id: str, served: Served, item_ids: Sequence[Any], scores: np.ndarray
    ) -> None:
        """Keep what one answer served (event loop; cheap: Redis writes are queued)."""
        now = time.monotonic()
        answer = Answer(
            served, item_ids, np.asarray(scores, np.float32), now + self.settings.feedback_ttl_s
        )
        self.answers.pop(request_id, None)
        self.answers[request_id] = answer
        while len(self.answers) > self.settings.feedback_max_requests:
            self.answers.popitem(last=False)
        while self.answers:
            oldest = next(iter(self.answers.values()))
            if oldest.expires > now:
                break
            self.answers.popitem(last=False)
        if self._writer is not None:
            self._queue.put((request_id, answer))

    def _key(self, kind: str, *parts: Any) -> str:
        return f"{self.ns}:{kind}:" + json.dumps(parts, separators=(",", ":"))

    def _write(self) -> None:
        ttl_ms = int(self.settings.feedback_ttl_s * 1000)
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 256:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                pipe = self.redis.pipeline(transaction=False)
                for rid, answer in batch:
                    key = self._key("answer", rid)
                    pipe.hset(key, "r", answer.to_json())
                    pipe.pexpire(key, ttl_ms)
                pipe.execute()
            except Exception as exc:  # Redis down: feedback joins on this replica only
                log.warning("feedback: %d answers not shared (%s)", len(batch), exc)

    # ------------------------------------------------------------------ feedback
    async def submit(self, batch: FeedbackBatch) -> dict[str, Any]:
        """Join and record a batch of events (all or nothing; see the module docstring)."""
        events = batch.events
        limit = self.settings.feedback_max_events
        if len(events) > limit:
            self.metrics.feedback_events.labels("refused").inc(len(events))
            raise Refused(
                f"the batch has {len(events)} events, over the limit of {limit} "
                "(MDLORA_FEEDBACK_MAX_EVENTS); split it",
            )
        try:
            answers = await self._answers({e.request_id for e in events})
            joined = self._join(events, answers)
        except ServiceError:
            self.metrics.feedback_events.labels("refused").inc(len(events))
            raise
        if self.redis is not None:
            fresh = await self._shared(self._record_shared, joined, answers)
        else:
            fresh = self._record_local(joined, answers)
        dup = len(events) - len(fresh)
        self.metrics.feedback_events.labels("joined").inc(len(fresh))
        if dup:
            self.metrics.feedback_events.labels("duplicate").inc(dup)
        keys = {answers[rid].served.key for rid, _, _ in fresh}
        decisions = {}
        for key in sorted(keys):
            decision = await self.check(key)
            if decision is not None:
                decisions["/".join(key)] = decision
        return {"accepted": len(fresh), "duplicates": dup, "guard": decisions}

    async def _answers(self, ids: set[str]) -> dict[str, Answer]:
        now = time.monotonic()
        found = {r: a for r in ids if (a := self.answers.get(r)) is not None and a.expires > now}
        missing = sorted(ids - set(found))
        if missing and self.redis is not None:
            found.update(await self._shared(self._fetch_shared, missing))
            missing = sorted(ids - set(found))
        if missing:
            raise NotFound(
                f"{len(missing)} request id(s) unknown or expired, e.g. {missing[:5]}: feedback is "
                "kept for answers of domains with a running rollout, for MDLORA_FEEDBACK_TTL_S; "
                "nothing was recorded",
                unknown_request_ids=missing[:100],
            )
        return found

    async def _shared(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` (Redis calls) on a worker thread; :class:`Unavailable` when Redis fails."""
        import redis

        try:
            return await asyncio.to_thread(fn, *args)
        except (redis.RedisError, OSError) as exc:
            self.metrics.feedback_events.labels("refused").inc()
            raise Unavailable(
                f"the shared feedback store (Redis) is unavailable: {exc}; send it again"
            ) from None

    def _fetch_shared(self, ids: list[str]) -> dict[str, Answer]:
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(self._key("answer", rid), "r")
        expires = time.monotonic() + self.settings.feedback_ttl_s
        return {
            rid: Answer.from_json(data, expires)
            for rid, data in zip(ids, pipe.execute(), strict=True)
            if data
        }

    def _join(
        self, events: Sequence[FeedbackEvent], answers: dict[str, Answer]
    ) -> list[tuple[str, int, bool]]:
        out, seen, bad = [], set(), []
        for n, e in enumerate(events):
            i = answers[e.request_id].index(e)
            if i is None:
                bad.append(n)
            elif (e.request_id, i) not in seen:
                seen.add((e.request_id, i))
                out.append((e.request_id, i, e.clicked))
        if bad:
            raise Refused(
                f"{len(bad)} event(s) name an item their answer did not score (events "
                f"{bad[:10]}): give the item's id or its 0-based position in that request; "
                "nothing was recorded",
                events=bad[:100],
            )
        return out

    def _record_local(
        self, joined: list[tuple[str, int, bool]], answers: dict[str, Answer]
    ) -> list[tuple[str, int, bool]]:
        fresh = []
        for rid, i, clicked in joined:
            answer = answers[rid]
            if i in answer.claimed:
                continue
            answer.claimed.add(i)
            s = answer.served
            window = self.windows.get((s.key, s.version))
            if window is None:
                window = self.windows[(s.key, s.version)] = Window(self.settings.feedback_window)
            window.append(float(answer.scores[i]), clicked)
            fresh.append((rid, i, clicked))
        return fresh

    def _record_shared(
        self, joined: list[tuple[str, int, bool]], answers: dict[str, Answer]
    ) -> list[tuple[str, int, bool]]:
        ttl_ms = int(self.settings.feedback_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for rid, i, _ in joined:
            key = self._key("answer", rid)
            pipe.hsetnx(key, f"c{i}", 1)
            pipe.pexpire(key, ttl_ms)
        claimed = pipe.execute()[::2]
        fresh = [j for j, ok in zip(joined, claimed, strict=True) if ok]
        pipe = self.redis.pipeline(transaction=False)
        window = self.settings.feedback_window
        for rid, i, clicked in fresh:
            s = answers[rid].served
            key = self._key("window", *s.key, s.version)
            pipe.rpush(key, f"{float(answers[rid].scores[i]):.7g},{int(clicked)}")
        for key in {self._key("window", *answers[r].served.key, answers[r].served.version)
                    for r, _, _ in fresh}:  # fmt: skip
            pipe.ltrim(key, -window, -1)
        pipe.execute()
        return fresh

    # ------------------------------------------------------------------ statistics
    def _window(self, key: DomainKey, version: int) -> tuple[np.ndarray, np.ndarray]:
        if self.redis is None:
            window = self.windows.get((key, version))
            return window.arrays() if window else (np.zeros(0), np.zeros(0, bool))
        raw = self.redis.lrange(self._key("window", *key, version), 0, -1)
        pairs = [r.split(b",") for r in raw]
        return (
            np.array([float(p[0]) for p in pairs], np.float64),
            np.array([p[1] == b"1" for p in pairs], bool),
        )

    def stats(self, key: DomainKey, version: int) -> dict[str, Any]:
        """The window statistics of ``key`` at ``version`` (also set as gauges)."""
        out = window_stats(*self._window(key, version))
        for name in WINDOW_STATS:
            value = out[name]
            gauge = self.metrics.feedback_window[name].labels(key[0], key[1], str(version))
            gauge.set(math.nan if value is None else value)
        return out

    def rollout_stats(self, key: DomainKey, rollout: Rollout) -> dict[str, Any]:
        canary = self.stats(key, rollout.version)
        return {"canary": canary, "stable": self.stats(key, rollout.stable)}

    async def status(self, key: DomainKey) -> dict[str, Any]:
        """``GET /v1/rollouts/...``: the rollout, its versions' feedback and the guard."""
        out = self.control.rollouts.describe(key)
        rollout = rollout_of(self.control.known_state, key)
        assert rollout is not None
        stats = (
            await self._shared(self.rollout_stats, key, rollout)
            if self.redis is not None
            else self.rollout_stats(key, rollout)
        )
        s = self.settings
        out["feedback"] = stats
        out["guard"] = {
            "enabled": s.rollout_guard,
            "min_events": s.rollout_min_events,
            "logloss_margin": s.rollout_logloss_margin,
            "calibration_margin": s.rollout_calibration_margin,
        }
        return out

    async def check(self, key: DomainKey, force: bool = False) -> dict[str, Any] | None:
        """Run the guard on ``key``'s running rollout; the abort it made, if any."""
        if not self.settings.rollout_guard:
            return None
        rollout = rollout_of(self.control.known_state, key)
        if rollout is None or not rollout.running:
            return None
        now = time.monotonic()
        if not force and now - self._checked.get(key, -math.inf) < (
            self.settings.rollout_guard_interval_s
        ):
            return None
        self._checked[key] = now
        try:
            stats = (
                await self._shared(self.rollout_stats, key, rollout)
                if self.redis is not None
                else self.rollout_stats(key, rollout)
            )
        except ServiceError:  # Redis down: judged at the next feedback
            return None
        verdict = guard_verdict(stats["canary"], stats["stable"], self.settings)
        if verdict is None:
            return None
        check, reason = verdict
        control = self.control
        try:
            out = await control.run(
                control.rollouts.decide, key, "abort", "guard", f"{check}: {reason}", rollout.id
            )
        except ServiceError as exc:  # decided meanwhile (another replica), or registry down
            log.info("guard on %s/%s: no abort (%s)", *key, exc.message)
            return None
        self.metrics.guard_aborts.labels(key[0], key[1], check).inc()
        return out


def open_feedback(
    settings: ServiceSettings, metrics: ServiceMetrics, control: ControlPlane, model_id: str
) -> Feedback:
    """Feedback shared through the registry's Redis when there is one, else in memory."""
    if settings.registry != "redis":
        return Feedback(settings, metrics, control)
    import redis

    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    with contextlib.suppress(Exception):
        client.ping()
    return Feedback(
        settings, metrics, control, client, f"{settings.redis_prefix}:feedback:{model_id}"
    )
