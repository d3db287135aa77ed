"""Scoring runtimes (torch, ONNX Runtime) and the micro-batcher in front of them.

A runner is attached to every :class:`~service.snapshot.Snapshot` when it is built (off the
request path) and scores encoded rows with that snapshot's weights:

* :class:`TorchRunner`: ``model.score_batch`` under ``torch.inference_mode`` on the snapshot's
  device (CUDA when present);
* :class:`OnnxRunner`: one ONNX Runtime session per artifact
  (``mdlora.formats.onnx_export``) fed each snapshot's adapter banks as inputs, so a
  registration needs no re-export (MultiLoRA, whose adapters are baked into its graph, is
  re-exported per snapshot, off the request path).

:class:`MicroBatcher` runs every model call on one worker thread. Requests that arrive while a
call is running are merged into the next call (a domain-mixed batch is what the core is built
for), so concurrent requests share one call without any deliberate wait.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mdlora.formats.files import ONNX_MODEL
from mdlora.models import grouped
from mdlora.models.features import EncodedBatch
from mdlora.models.lora import BLOCK_SIZES
from mdlora.models.model import MultiDomainModel
from mdlora.service.metrics import ServiceMetrics
from mdlora.service.snapshot import Snapshot

log = logging.getLogger("mdlora.service")
SHIPPED_ONNX = ONNX_MODEL  # what `mdlora export` writes next to the artifact


@dataclass
class Rows:
    """Encoded rows of one request (or of several, concatenated).

    ``domains`` holds ids of the snapshot's serving model; ``backbone`` marks rows to score
    with the backbone alone where that needs a separate call (MultiLoRA), else None.
    """

    sparse: np.ndarray  # [n, n_sparse] int64
    dense: np.ndarray  # [n, n_dense] float32
    domains: np.ndarray  # [n, n_div] int64
    multi_hot: np.ndarray | None = None  # [n, M, L] int64
    backbone: np.ndarray | None = None  # [n] bool

    def __len__(self) -> int:
        return int(self.domains.shape[0])

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        bb = None
        if any(p.backbone is not None for p in parts):
            bb = np.concatenate(
                [p.backbone if p.backbone is not None else np.zeros(len(p), bool) for p in parts]
            )
        mh = None
        if parts[0].multi_hot is not None:
            mh = np.concatenate([p.multi_hot for p in parts if p.multi_hot is not None])
        return Rows(
            np.concatenate([p.sparse for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.domains for p in parts]),
            mh,
            bb,
        )

    def take(self, index: np.ndarray) -> Rows:
        return Rows(
            self.sparse[index],
            self.dense[index],
            self.domains[index],
            None if self.multi_hot is None else self.multi_hot[index],
            None,
        )


class Runner(Protocol):
    def score(self, rows: Rows) -> np.ndarray: ...


def runner_of(snapshot: Snapshot) -> Runner:
    """``snapshot``'s runner (the runtime attaches one before the snapshot serves)."""
    runner = snapshot.runner
    if runner is None:
        raise RuntimeError("this snapshot has no runner yet: the runtime prepares it first")
    return runner


def configure_thread(threads: int | None) -> None:
    """Intra-op threads for model calls made from the calling thread.

    torch's count is process-wide; numba's (the fused routing kernel) is per calling thread,
    so every thread that runs the model calls this. Left at a parallel default on a small
    machine, the kernel's threads fight the serving threads for the cores.

    Order matters: starting numba's OpenMP layer resets OpenMP's thread count, which torch
    reads, so numba is set (and started) first and torch last (measured: the other order left
    torch at 2 threads and ``embedding_bag`` 70x slower on a busy 2-core machine).
    """
    if threads is None:
        return
    try:
        import numba
    except ImportError:
        pass
    else:
        numba.set_num_threads(min(threads, int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))))
    torch.set_num_threads(threads)


def synthetic_rows(model: MultiDomainModel, n: int, seed: int = 0) -> Rows:
    """``n`` rows of random valid ids over every domain (for warm-up and routing timing)."""
    gen = np.random.default_rng(seed)
    cfg = model.config
    spec = cfg.features
    sparse = np.stack([gen.integers(0, f.vocab_size, n) for f in spec.sparse], 1)
    multi_hot = None
    if spec.multi_hot:
        width = spec.max_multi_hot_len
        multi_hot = np.stack(
            [gen.integers(-1, m.vocab_size, (n, width)) for m in spec.multi_hot], 1
        ).astype(np.int64)
    domains = np.stack([gen.integers(0, len(d.domains), n) for d in cfg.divisions], 1)
    return Rows(
        sparse.reshape(n, len(spec.sparse)).astype(np.int64),
        gen.random((n, len(spec.dense)), dtype=np.float32),
        domains.astype(np.int64),
        multi_hot,
    )


def choose_routing(model: MultiDomainModel, routing: str) -> list[str]:
    """Apply the ``MDLORA_ROUTING`` setting: the artifact's strategy, one strategy, or the
    fastest per layer timed on a synthetic mixed-domain batch (``auto``)."""
    if routing == "artifact" or model.stage.name not in ("adapters", "gate"):
        return model.routing
    if routing != "auto":
        model.set_routing(routing)
        return model.routing
    rows = synthetic_rows(model, 512)
    batch = EncodedBatch.from_arrays(
        rows.sparse, rows.dense, rows.domains, rows.multi_hot, device=model.device
    )
    return model.tune_routing(batch, repeats=10)


def resolve_device(name: str | None) -> torch.device:
    """``name``, or CUDA when present, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_batch(rows: Rows, device: torch.device, packed: bool | None = None) -> EncodedBatch:
    """``rows`` as a batch on ``device``. On a GPU (``packed``; default: on CUDA) the arrays
    go over in one copy: packed into one pinned host buffer (torch's caching host allocator
    reuses it once its copy is done), copied without blocking, and viewed by type on the
    device; copying each pageable array instead blocks the host once per array."""
    if not (device.type == "cuda" if packed is None else packed):
        return EncodedBatch.from_arrays(
            rows.sparse, rows.dense, rows.domains, rows.multi_hot, device=device
        )
    # the 8-byte arrays first, so every part starts aligned for its type
    parts = [np.ascontiguousarray(rows.sparse, np.int64),
             np.ascontiguousarray(rows.domains, np.int64)]  # fmt: skip
    if rows.multi_hot is not None:
        parts.append(np.ascontiguousarray(rows.multi_hot, np.int64))
    parts.append(np.ascontiguousarray(rows.dense, np.float32))
    ends = np.cumsum([p.nbytes for p in parts]).tolist()
    host = torch.empty(ends[-1], dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat = host.numpy()
    for part, start, end in zip(parts, [0, *ends[:-1]], ends, strict=True):
        flat[start:end] = part.reshape(-1).view(np.uint8)
    moved = host.to(device, non_blocking=True)
    out = [
        moved[start:end].view(torch.float32 if part.dtype == np.float32 else torch.int64)
        .view(part.shape)
        for part, start, end in zip(parts, [0, *ends[:-1]], ends, strict=True)
    ]  # fmt: skip
    return EncodedBatch(
        sparse=out[0], domains=out[1], dense=out[-1],
        multi_hot=out[2] if rows.multi_hot is not None else None,
    )  # fmt: skip


class TorchRunner:
    """Scores rows with the snapshot's torch models on their device."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.model = snapshot.serving_model
        self.backbone_model = snapshot.backbone_model
        self.device = self.model.device

    def _probs(self, model: MultiDomainModel, rows: Rows) -> np.ndarray:
        dev = self.device
        batch = device_batch(rows, dev)
        with torch.inference_mode():  # ids come from the snapshot's own domain table
            return model.score_batch(batch, check=dev.type == "cpu").float().cpu().numpy()

    def score(self, rows: Rows) -> np.ndarray:
        if rows.backbone is None or not rows.backbone.any() or self.backbone_model is None:
            return self._probs(self.model, rows)
        out = np.empty(len(rows), np.float32)
        bb = rows.backbone
        if (~bb).any():
            out[~bb] = self._probs(self.model, rows.take(~bb))
        out[bb] = self._probs(self.backbone_model, rows.take(bb))
        return out


class OnnxRuntime:
    """The ONNX Runtime path: exports the artifact's scorer once, then serves every snapshot.

    For MLoRA / MoE-MLoRA the graph takes the banks as inputs and one session serves every
    snapshot; MultiLoRA graphs have their adapters baked in and are exported per snapshot.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        threads: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """``device``: where the sessions score (``default_providers``: the CPU provider for
        a CPU device, the CUDA one on that GPU for ``cuda:N``; None: a GPU when there is one)."""
        from mdlora.formats.onnx_export import default_providers

        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mdlora-onnx-"))
        self.threads = threads
        self.providers = default_providers(device)
        self._sessions: dict[str, Any] = {}
        self._count = 0
        self._lock = threading.Lock()

    def _export(self, model: MultiDomainModel, key: str | None) -> Any:
        from mdlora.formats.onnx_export import OnnxScorer, export_onnx

        with self._lock:
            if key is not None and key in self._sessions:
                return self._sessions[key]
            self._count += 1
            folder = self.workdir / f"scorer-{self._count}"
        try:
            folder.mkdir(parents=True)
            path = export_onnx(model, folder / "scorer.onnx")
            scorer = OnnxScorer(path, self.providers, self.threads)
        finally:
            # the session holds the graph (external data stays mapped while it lives), so the
            # files go at once: a replica that re-exports on every change must not fill /tmp
            shutil.rmtree(folder, ignore_errors=True)
        if key is not None:
            with self._lock:
                baked = [k for k in self._sessions if k.startswith(("baked:", "grown:"))]
                for old in baked[: max(0, len(baked) - 3)]:  # keep a few for rollbacks
                    del self._sessions[old]
                self._sessions[key] = scorer
        return scorer

    def close(self) -> None:
        """Drop the sessions and the export folder this runtime made."""
        with self._lock:
            self._sessions.clear()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _shipped(self, snapshot: Snapshot) -> Any:
        """The artifact's own ``model.onnx`` (``mdlora export``), if it takes bank inputs and
        was exported from this model in its serving stage."""
        from mdlora.formats.files import model_signature
        from mdlora.formats.onnx_export import OnnxScorer

        path = snapshot.info.path / SHIPPED_ONNX
        if not path.is_file():
            return None
        try:
            scorer = OnnxScorer(path, self.providers, self.threads)
        except Exception as exc:  # an unreadable file: export our own instead
            log.warning("ignoring %s: %s", path, exc)
            return None
        meta = scorer.metadata
        model = snapshot.model
        if (
            meta.get("mdlora.bank_inputs") != "true"
            or meta.get("mdlora.model_signature") != model_signature(model.config)
            or meta.get("mdlora.stage") != model.stage.name
        ):
            return None
        return scorer

    def runner(self, snapshot: Snapshot) -> OnnxRunner:
        from mdlora.formats.onnx_export import banks_from_model, has_bank_inputs

        model = snapshot.serving_model
        versions = sorted((k, v.version, v.sha256) for k, v in snapshot.adapters.items())
        versions += sorted(  # canaries are extra domains of the serving graph (service.rollout)
            (k, -c.domain_id, c.loaded.sha256) for k, c in snapshot.canaries.items()
        )
        if has_bank_inputs(model) and model.grown:
            # grown embedding rows are graph constants: one export per set of adapter versions
            key = f"grown:{snapshot.info.model_id}:{hash(tuple(versions))}"
            return OnnxRunner(self._export(model, key), banks_from_model(model))
        if has_bank_inputs(model):
            key = f"banked:{snapshot.info.model_id}"
            with self._lock:
                session = self._sessions.get(key)
            if session is None:
                session = self._shipped(snapshot) or self._export(model, key)
                with self._lock:
                    self._sessions[key] = session
            return OnnxRunner(session, banks_from_model(model))
        backbone = None
        if snapshot.backbone_model is not None:
            backbone = self._export(snapshot.backbone_model, f"backbone:{snapshot.info.model_id}")
        # the adapters are constants of this graph: one export per set of adapter versions
        key = f"baked:{snapshot.info.model_id}:{hash(tuple(versions))}"
        return OnnxRunner(self._export(model, key), [], backbone)


class OnnxRunner:
    """Scores rows with an ONNX Runtime session and one snapshot's banks."""

    def __init__(self, session: Any, banks: list[Any], backbone: Any = None) -> None:
        self.session, self.banks, self.backbone = session, banks, backbone

    def _probs(self, session: Any, rows: Rows, banks: list[Any]) -> np.ndarray:
        return np.asarray(
            session.score(rows.sparse, rows.dense, rows.domains, rows.multi_hot, banks),
            dtype=np.float32,
        )

    def score(self, rows: Rows) -> np.ndarray:
        if rows.backbone is None or not rows.backbone.any() or self.backbone is None:
            return self._probs(self.session, rows, self.banks)
        out = np.empty(len(rows), np.float32)
        bb = rows.backbone
        if (~bb).any():
            out[~bb] = self._probs(self.session, rows.take(~bb), self.banks)
        out[bb] = self._probs(self.backbone, rows.take(bb), [])
        return out


#: the largest batch the warm-up scores to compile the grouped kernel's block sizes
WARM_UP_MAX_ROWS = 65_536


def warm_up(snapshot: Snapshot) -> None:
    """Score a few rows so lazy state (folded inference banks) is built before the swap.

    On CUDA with the grouped kernel (``mdlora.models.grouped``), which Triton compiles once
    per block size and layer shape, a mixed batch of each size is scored too: the
    compilations (on first use in a process; not yet timed on a GPU) happen here, not in the
    first requests. Once per process and tower shape: a later snapshot (an adapter swap)
    needs no new compilation, and those batches would only compete with live traffic.
    """
    model, runner = snapshot.serving_model, runner_of(snapshot)
    rows = synthetic_rows(model, 4)
    if snapshot.backbone_model is not None:
        rows.backbone = np.array([False, True, False, True])
    runner.score(rows)
    if isinstance(runner, TorchRunner) and grouped.runs_on(runner.device):
        n_primary = len(model.config.divisions[0].domains)
        tower = model.tower
        layers = tuple((lin.in_features, lin.out_features) for lin in tower.linears)
        shape = (str(runner.device), layers, repr(tower.norms), repr(tower.acts))
        for block in BLOCK_SIZES:
            n = 2 * n_primary * block  # the rows that choose this block size
            if n > WARM_UP_MAX_ROWS:  # a batch this large is rare enough to compile itself
                break
            if (shape, block) in grouped.WARMED:
                continue
            runner.score(synthetic_rows(model, n, seed=block))
            grouped.WARMED.add((shape, block))


PROBE_ROWS = 64


def probe_problem(snapshot: Snapshot, division: str, domain: str) -> str | None:
    """Score a probe batch in ``division/domain`` with ``snapshot`` (random ids, the
    out-of-vocabulary ones, the ends of the dense range, and every id the domain grew, up to
    ``PROBE_GROWN``); what is wrong with the scores, or None when they are finite
    probabilities that are not all saturated at exactly 0 or 1."""
    rows = synthetic_rows(snapshot.serving_model, PROBE_ROWS, seed=1)
    rows.sparse[:4] = 0  # out-of-vocabulary rows
    rows.dense[4:8] = 0.0
    rows.dense[8:12] = 1.0
    grown = _grown_probe(snapshot, division, domain)
    batches = [rows] if grown is None else [rows, grown]
    d = snapshot.domain_ids[division][domain]
    for batch in batches:
        batch.domains[:, snapshot.divisions.index(division)] = d
    runner = runner_of(snapshot)
    probs = np.concatenate([np.asarray(runner.score(b), dtype=np.float64) for b in batches])
    bad = int((~np.isfinite(probs)).sum())
    if bad:
        return (
            f"its scores are not finite numbers for {bad} of {len(probs)} probe rows (weights "
            "too large for float32 arithmetic?"
            + (" the ids the package grew are among them)" if grown is not None else ")")
        )
    if ((probs == 0.0) | (probs == 1.0)).all():
        return (
            f"every one of its {len(probs)} probe scores is exactly {probs[0]:.0f}: weights "
            "this large saturate the model, so no two items could be told apart"
        )
    return None


#: the most grown ids of a domain the probe scores (each of its grown rows, up to this)
PROBE_GROWN = 4096


def _grown_probe(snapshot: Snapshot, division: str, domain: str) -> Rows | None:
    """Probe rows that use the ids ``division/domain`` grew (their rows are only reached
    through them): each grown column cycles through its ids, up to ``PROBE_GROWN`` rows."""
    lookup = snapshot.grown_lookups.get((division, domain))
    if lookup is None:
        return None
    ids = {c: np.fromiter(m.values(), np.int64) for c, m in lookup.maps.items() if m}
    if not ids:
        return None
    n = min(PROBE_GROWN, max(len(v) for v in ids.values()))
    rows = synthetic_rows(snapshot.serving_model, n, seed=2)
    enc = snapshot.base.encoder
    multi = [m.name for m in enc.multi_hot_columns]
    for col, values in ids.items():
        cycled = np.resize(values, n)
        if col in enc.sparse_columns:
            rows.sparse[:, enc.sparse_columns.index(col)] = cycled
        elif col in multi and rows.multi_hot is not None:
            rows.multi_hot[:, multi.index(col), 0] = cycled
    return rows


@dataclass
class _Job:
    snapshot: Snapshot
    rows: Rows
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop


def _resolve(fut: asyncio.Future[np.ndarray], value: np.ndarray | BaseException) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


class MicroBatcher:
    """Merges the requests that wait for the model into one model call.

    Inline (default): model calls run on the event loop itself. A request queues its rows and
    the first one schedules a flush for the next loop iteration; every request that reaches
    the queue before then joins the same call. One thread does everything, so there is no
    interpreter-lock contention between parsing and scoring (measured: on two cores with the
    client on one, a scoring thread spent more time waiting for the lock than it saved).

    ``thread=True``: model calls run on one worker thread, merging whatever queued while the
    previous call ran (overlaps parsing with scoring where cores allow).

    ``enabled=False``: one model call per request.
    """

    def __init__(
        self,
        metrics: ServiceMetrics | None = None,
        max_rows: int = 4096,
        enabled: bool = True,
        threads: int | None = None,
        thread: bool = False,
    ) -> None:
        self.metrics, self.max_rows, self.enabled = metrics, max_rows, enabled
        self.threads, self.use_thread = threads, thread
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending: list[_Job] = []
        self._flush_scheduled = False
        self._running = False

    def start(self) -> None:
        self._running = True
        if self.use_thread and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mdlora-scorer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    async def score(self, snapshot: Snapshot, rows: Rows) -> np.ndarray:
        if not self._running:
            raise RuntimeError("the scorer is not running (app not started?)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        job = _Job(snapshot, rows, fut, loop)
        if self.use_thread:
            self._queue.put(job)
        elif not self.enabled:
            self._run([job], threadsafe=False)
        else:
            self._pending.append(job)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        jobs, self._pending = self._pending, []
        self._run_groups(jobs, threadsafe=False)

    def _run_groups(self, jobs: list[_Job], threadsafe: bool) -> None:
        """One call per snapshot (and per ``max_rows``), in arrival order."""
        groups: dict[int, list[list[_Job]]] = {}
        for job in jobs:
            chunks = groups.setdefault(id(job.snapshot), [[]])
            if chunks[-1] and sum(len(j.rows) for j in chunks[-1]) + len(job.rows) > self.max_rows:
                chunks.append([])
            chunks[-1].append(job)
        for chunks in groups.values():
            for chunk in chunks:
                self._run(chunk, threadsafe)

    def _work(self) -> None:
        configure_thread(self.threads)
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs = [first]
            rows = len(first.rows)
            while self.enabled and rows < self.max_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                rows += len(nxt.rows)
            self._run_groups(jobs, threadsafe=True)

    def _run(self, jobs: list[_Job], threadsafe: bool) -> None:
        def deliver(job: _Job, value: np.ndarray | BaseException) -> None:
            if threadsafe:
                job.loop.call_soon_threadsafe(_resolve, job.future, value)
            else:
                _resolve(job.future, value)

        try:
            rows = Rows.concat([j.rows for j in jobs])
            probs = runner_of(jobs[0].snapshot).score(rows)
            if self.metrics is not None:
                self.metrics.batch_rows.observe(len(rows))
        except Exception as exc:  # every waiter gets the error; the scorer keeps going
            log.exception("model call failed")
            for j in jobs:
                deliver(j, exc)
            return
        start = 0
        for j in jobs:
            n = len(j.rows)
            deliver(j, probs[start : start + n])
            start += n
