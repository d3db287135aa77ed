"""From a validated predict request to scores: features, domains, encoding, the model call.

A request names one user, n candidate items and its domain(s). Features come inline
(``user.features``, ``items[i].features``); what is missing is read from the feature store
when the user / item ids are given. Each adapted division needs a domain: taken from the
request (``domain`` for the primary division, ``domains`` for any), or from the user's feature
of the same name (a MultiLoRA request can omit ``gender`` when the user's features have it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdlora.formats.encoder import canonical_value
from mdlora.models.features import OOV_ID
from mdlora.service.errors import ModelFault, NotFound, Refused, ServiceError
from mdlora.service.feature_store import FeatureStore, RequestEncoder
from mdlora.service.metrics import UNKNOWN_DOMAIN_LABEL, ServiceMetrics
from mdlora.service.rollout import Served, route
from mdlora.service.runtime import MicroBatcher, Rows
from mdlora.service.schemas import PredictRequest
from mdlora.service.snapshot import Snapshot

log = logging.getLogger("mdlora.service")
FEATURE_STORE_DOWN = "feature store unavailable: features not given inline were scored as unknown"
STORE_RETRY_S = 1.0  # after a failure, requests skip the feature store this long


@dataclass
class Gathered:
    """One request's raw features: the user's values and the items' columns."""

    user: dict[str, Any]
    items: dict[str, list[Any]]
    n: int
    warnings: list[str] = field(default_factory=list)
    id_columns: tuple[str, ...] = ()  # item columns filled from validated ids only
    stored: set[str] = field(default_factory=set)  # columns filled from the feature store


@dataclass
class Prepared:
    """One request, encoded, with what its answer reports."""

    rows: Rows
    domains: dict[str, str]
    adapter_versions: dict[str, int]
    backbone_only: bool
    label: str
    warnings: list[str]
    served: Served | None = None  # the arm of a running rollout (service.rollout)


class Predictor:
    """Scores predict requests against the serving snapshot (see the module docstring)."""

    def __init__(
        self,
        encoder: RequestEncoder,
        batcher: MicroBatcher,
        metrics: ServiceMetrics,
        user_field: str | None,
        item_field: str | None,
        unknown_domain: str = "refuse",
        store: FeatureStore | None = None,
        max_items: int = 1000,
    ) -> None:
        self.encoder, self.batcher, self.metrics = encoder, batcher, metrics
        self.user_field, self.item_field = user_field, item_field
        self.unknown_domain, self.store, self.max_items = unknown_domain, store, max_items
        self._store_down_until = 0.0
        self.feedback: Any = None  # remembers what rollouts served (service.feedback)

    # ------------------------------------------------------------------ features
    async def gather(self, req: PredictRequest) -> Gathered:
        user: dict[str, Any] = dict(req.user.features)
        if req.user.id is not None:
            if self.user_field is None:
                raise Refused(
                    "this model has no user-id field: send user.features "
                    "(or set MDLORA_USER_ID_FIELD)",
                )
            user.setdefault(self.user_field, req.user.id)
        items: dict[str, list[Any]] = {}
        if req.item_ids is not None:
            n = len(req.item_ids)
            if n > self.max_items:
                raise self._too_many(n)
            items[self._item_field()] = list(req.item_ids)
        else:
            assert req.items is not None
            n = len(req.items)
            if n > self.max_items:
                raise self._too_many(n)
            for i, item in enumerate(req.items):
                if item.id is not None:
                    items.setdefault(self._item_field(), [None] * n)[i] = item.id
                for k, v in item.features.items():
                    items.setdefault(k, [None] * n)[i] = v
        out = Gathered(user, items, n)
        if self.item_field is not None and not any(
            k == self.item_field for item in req.items or () for k in item.features
        ):
            out.id_columns = (self.item_field,)
        if self.store is not None:
            await self._from_store(req, out)
        return out

    def _item_field(self) -> str:
        if self.item_field is None:
            raise Refused(
                "this model has no item-id field: send items[].features "
                "(or set MDLORA_ITEM_ID_FIELD)",
            )
        return self.item_field

    def _too_many(self, n: int) -> Refused:
        return Refused(
            f"the request has {n} items, over the limit of {self.max_items} per request "
            "(MDLORA_MAX_ITEMS); split it into several requests",
        )

    async def _from_store(self, req: PredictRequest, g: Gathered) -> None:
        assert self.store is not None
        import redis

        if time.monotonic() < self._store_down_until:  # failed a moment ago: do not wait again
            g.warnings.append(FEATURE_STORE_DOWN)
            return
        try:
            meta = await self.store.meta()
            if meta is None:
                return
            uid = g.user.get(meta.user_id_field)
            user_cols = [c for c in meta.user_columns if c not in g.user] if uid is not None else []
            ids = g.items.get(meta.item_id_field)
            item_cols: list[str] = []
            if ids is not None:
                item_cols = [
                    c
                    for c in meta.item_columns
                    if c not in g.items or any(v is None for v in g.items[c])
                ]
            if not user_cols and not item_cols:
                return
            user, items = await self.store.fetch(uid, user_cols, ids or [], item_cols)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            if time.monotonic() >= self._store_down_until:
                log.warning("feature store: %s", exc)
            self._store_down_until = time.monotonic() + STORE_RETRY_S
            g.warnings.append(FEATURE_STORE_DOWN)
            return
        g.user.update(user)
        g.stored.update(user)
        g.stored.update(items)
        for col, stored in items.items():
            have = g.items.get(col)
            g.items[col] = (
                stored
                if have is None
                else [s if h is None else h for h, s in zip(have, stored, strict=True)]
            )

    # ------------------------------------------------------------------ domains
    def _domain_names(
        self, req: PredictRequest, snap: Snapshot, user: dict[str, Any]
    ) -> dict[str, str]:
        names: dict[str, str] = {}
        primary = snap.divisions[0]
        for div, name in req.domains.items():
            if div not in snap.divisions:
                raise Refused(
                    f"unknown division {div!r} in domains; this model's "
                    f"divisions are {snap.divisions}",
                )
            names[div] = str(name)
        if req.domain is not None:
            domain = str(req.domain)
            if names.get(primary, domain) != domain:
                raise Refused(
                    f"domain {domain!r} and domains[{primary!r}] {names[primary]!r} disagree"
                )
            names[primary] = domain
        for div in snap.divisions:
            if div not in names and user.get(div) is not None:
                names[div] = canonical_value(user[div]) or ""
        missing = [d for d in snap.adapted if d not in names]
        if missing:
            raise Refused(
                f"no domain for division(s) {missing}: give 'domain' (the primary division "
                f"{primary!r}), 'domains': {{division: name}}, or the user's feature of that name",
            )
        return names

    def prepare(self, req: PredictRequest, snap: Snapshot, g: Gathered) -> Prepared:
        """Encode one request for ``snap`` (raises a :class:`ServiceError` for what it refuses)."""
        names = self._domain_names(req, snap, g.user)
        ids = []
        unknown = []
        for div in snap.divisions:
            d = snap.domain_ids[div].get(names.get(div, ""))
            if d is None and div in snap.adapted:
                unknown.append(div)
            ids.append(d or 0)
        backbone = bool(unknown)
        if backbone and self.unknown_domain == "refuse":
            div = unknown[0]
            raise NotFound(
                f"unknown domain {names[div]!r} in division {div!r}; known domains: "
                f"{snap.domains(div)} (register an adapter for it, or set "
                "MDLORA_UNKNOWN_DOMAIN=backbone to score unknown domains with the backbone alone)",
                known_domains={d: snap.domains(d) for d in snap.adapted},
            )
        if backbone and snap.backbone_id is not None:
            ids[0] = snap.backbone_id
        user = dict(g.user)
        for div, name in names.items():
            user.setdefault(div, name)  # a division that is also a feature column
        sparse, dense, multi_hot = self.encoder.encode(user, g.items, g.n, g.id_columns)
        if snap.grown_lookups and not backbone:  # ids an added domain brought with it
            for div in snap.adapted:
                lookup = snap.grown_lookups.get((div, names[div]))
                if lookup is not None:
                    self.encoder.apply_grown(lookup, user, g.items, sparse, multi_hot)
        notes = self._input_warnings(user, g, sparse, set(snap.divisions))
        domains = np.empty((g.n, len(ids)), np.int64)
        domains[:] = ids
        flag = np.full(g.n, True) if backbone and snap.backbone_model is not None else None
        rows = Rows(sparse, dense, domains, multi_hot, flag)
        versions = (
            {} if backbone else {d: snap.adapters[(d, names[d])].version for d in snap.adapted}
        )
        served = None
        if snap.canaries and not backbone:  # a canary rollout: the user's arm
            uid = g.user.get(self.user_field) if self.user_field else None
            uid = req.user.id if uid is None else uid
            served = route(snap, names, domains, versions, canonical_value(uid))
            if served is not None:
                self.metrics.rollout_requests.labels(*served.key, served.arm).inc()
        primary = names.get(snap.divisions[0], "")
        label = primary if primary in snap.domain_ids[snap.divisions[0]] else UNKNOWN_DOMAIN_LABEL
        warnings = [*g.warnings, *notes]
        if backbone:
            warnings.append(f"unknown domain in {unknown}: scored with the backbone alone")
        return Prepared(
            rows, {d: names[d] for d in names}, versions, backbone, label, warnings, served
        )

    def _input_warnings(
        self, user: dict[str, Any], g: Gathered, sparse: np.ndarray, divisions: set[str]
    ) -> list[str]:
        """What the scores could not use: unknown ids and names, missing or bad values.

        The request is still scored (an unknown id is a cold-start user or item, which the
        model scores through its out-of-vocabulary row); the answer says so.
        """
        enc, out = self.encoder, []
        given = set(user) | set(g.items)
        unknown = sorted(given - enc.columns - divisions)
        if unknown:
            out.append(
                f"unknown feature(s) {unknown[:10]} ignored; this model reads {sorted(enc.columns)}"
            )
        # a column counts as given where it has a value: an item the request or the feature
        # store gave no value for (not published, say) is scored with that feature missing
        nones = {c: sum(v is None for v in vals) for c, vals in g.items.items()}  # one pass
        nothing = {c for c, k in nones.items() if k == len(g.items[c])}
        nothing |= {c for c, v in user.items() if v is None and c not in g.items}
        missing = sorted(enc.columns - (given - nothing))
        partly = {c: k for c, k in nones.items() if k and c in enc.columns and c not in nothing}
        if partly:
            shown = ", ".join(f"{c} for {k} of {g.n}" for c, k in sorted(partly.items())[:10])
            out.append(f"no value for item feature(s) {shown} items: scored as missing there")
        if missing:
            where = (
                "or publish them to the feature store (mdlora publish-features)"
                if self.store is not None
                else "or publish them (mdlora publish-features) and serve with "
                "MDLORA_FEATURE_STORE=redis"
            )
            out.append(
                f"no value for feature(s) {missing[:10]}: scored as missing (send them in "
                f"user.features / items[].features, {where})"
            )
        uf, itf = self.user_field, self.item_field
        if (
            uf in enc.sparse
            and user.get(uf) is not None
            and sparse[0, enc.sparse.index(uf)] == OOV_ID
        ):
            out.append(
                f"user id {user[uf]!r} is not in the model's vocabulary: scored as a new user"
            )
        if itf in enc.sparse and itf in g.items:
            col = sparse[:, enc.sparse.index(itf)]
            ids = g.items[itf]
            oov = [ids[i] for i in np.flatnonzero(col == OOV_ID) if ids[i] is not None]
            if oov:
                out.append(
                    f"{len(oov)} of {g.n} item ids are not in the model's vocabulary (scored as "
                    f"new items), e.g. {oov[:5]}"
                )
        # only what the request itself sent (published features were numbers when written)
        bad = [
            c
            for c in enc.dense
            if c not in g.stored
            and (_not_a_number(user.get(c)) or any(map(_not_a_number, g.items.get(c, ()))))
        ]
        if bad:
            out.append(
                f"dense feature(s) {bad} have values that are not finite numbers: text, NaN and "
                "integers too large for a float are scored as missing, infinities as the ends "
                "of the training range"
            )
        return out

    # ------------------------------------------------------------------ scoring
    def answer(
        self, req: PredictRequest, snap: Snapshot, p: Prepared, probs: np.ndarray
    ) -> dict[str, Any]:
        bad = np.flatnonzero(~np.isfinite(probs))
        if bad.size:  # never sent as null / NaN: an error naming the items
            self.metrics.nonfinite_scores.labels(p.label).inc(int(bad.size))
            log.error(
                "non-finite scores for %d of %d items in %s (adapters %s)",
                bad.size, len(probs), p.domains, p.adapter_versions,
            )  # fmt: skip
            raise ModelFault(
                f"the model produced no valid score (NaN or infinite) for item(s) "
                f"{bad[:20].tolist()} of {len(probs)} in domain(s) {p.domains} with adapter "
                f"version(s) {p.adapter_versions}: a fault of the served adapter, not of the "
                "request; no score is sent for any item (the operator can roll the adapter back)",
                items=bad.tolist(),
            )
        self.metrics.items_scored.labels(p.label).inc(len(probs))
        request_id = req.request_id or os.urandom(12).hex()  # feedback names it
        if p.served is not None and self.feedback is not None:
            ids = req.item_ids if req.item_ids is not None else [i.id for i in req.items or ()]
            self.feedback.remember(request_id, p.served, ids, probs)
        return {
            "scores": probs.tolist(),
            "model_version": snap.info.model_version,
            "adapter_versions": p.adapter_versions,
            "domains": p.domains,
            "backbone_only": p.backbone_only,
            "registry_version": snap.registry_version,
            "request_id": request_id,
            "warnings": p.warnings,
        }

    async def predict(self, req: PredictRequest, snap: Snapshot) -> tuple[dict[str, Any], str]:
        """Answer one request on ``snap``; returns the body and the metrics domain label."""
        g = await self.gather(req)
        p = self.prepare(req, snap, g)
        probs = await self.batcher.score(snap, p.rows)
        return self.answer(req, snap, p, probs), p.label

    async def predict_many(
        self, reqs: Sequence[PredictRequest], snap: Snapshot
    ) -> tuple[list[dict[str, Any]], str]:
        """Answer several requests with one model call (errors name the failing index)."""
        gathered = await asyncio.gather(*(self.gather(r) for r in reqs), return_exceptions=True)
        prepared = []
        for i, (r, g) in enumerate(zip(reqs, gathered, strict=True)):
            try:
                if isinstance(g, BaseException):
                    raise g
                prepared.append(self.prepare(r, snap, g))
            except ServiceError as exc:
                raise exc.within(f"requests[{i}]", index=i) from None
        probs = await self.batcher.score(snap, Rows.concat([p.rows for p in prepared]))
        out, start = [], 0
        for i, (r, p) in enumerate(zip(reqs, prepared, strict=True)):
            n = len(p.rows)
            try:
                out.append(self.answer(r, snap, p, probs[start : start + n]))
            except ServiceError as exc:
                raise exc.within(f"requests[{i}]", index=i) from None
            start += n
        labels = {p.label for p in prepared}
        return out, labels.pop() if len(labels) == 1 else "(mixed)"


def _not_a_number(v: Any) -> bool:
    """A given value that a dense feature cannot use as is (text, NaN, infinity)."""
    cls = v.__class__
    if cls is bool or v is None or (cls is int and v.bit_length() < 1000):  # without float()
        return False
    if cls is float:
        return not math.isfinite(v)
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):  # text, an integer too large for a float
        return True
