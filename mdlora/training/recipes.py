"""Recipes beyond the papers' two-phase text: adaptation on fresh rows, joint MLoRA, and the
per-phase validation trajectory table.

**Adaptation on fresh rows** (``adapt_rows: fresh``). The papers' recipe (``mlora``: the
backbone trained on every training row, then the adapters on the same rows with the backbone
frozen) asks the adapters to learn from rows the backbone has already fitted; measured on
ML-1M and Amazon, validation AUC then falls from the first tenth of an epoch and early stopping
hands back the backbone. With ``adapt_rows: fresh`` a per-domain slice of the training rows
(``adapt_fraction``, 20% by default) is kept out of phase 1 and every later phase (adapters,
experts, gate, LoRA, fusion) trains on that slice only: the production shape where the backbone
is retrained rarely and a domain's adapter is refreshed on rows that arrived since. The slice
is a stratified random sample of each domain's rows (label balance kept), or, with
``adapt_order`` naming an order column (``seq_pos``, a timestamp), each domain's most recent
rows (ties broken at random, seeded). Note that a per-user position such as ``seq_pos`` makes
"most recent" mean "latest in long histories", which leans towards active users.

``finetune_fresh`` is the comparison the slice needs: the same phase 1 (the backbone on the
same rows, the same seed), then the whole backbone fine-tuned on the fresh slice. Adapters are
per domain and hot-loadable; a fine-tuned backbone changes every domain's scores.

**Joint MLoRA** (``mlora_joint``). What the public MLoRA code (gaohaining/MLoRA ``run.py``)
runs for MovieLens: backbone and every domain's LoRA trained together from scratch on all rows
in one phase (``joint``). The model is an ordinary MLoRA model in its ``adapters`` stage, so
its artifact exports, serves and takes ``add-domain`` like a two-phase one. There is no
reference "phase-1 backbone" to compare with: run ``base`` with the same seed for that.

No MoE-MLoRA analogue is offered. MoE-MLoRA's experts are *owned* by domains: each is first
trained on its own domain's rows alone, and the gate then learns how to mix experts that
already mean something. Trained together from scratch, nothing ties an expert to its owner
(every expert sees every domain through the gate), so the result would not be MoE-MLoRA with
a different schedule but a different, unpublished model; and there is no public one-phase
MoE-MLoRA recipe to replicate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mdlora.formats.encoder import LabeledArrays
from mdlora.models.features import EncodedBatch
from mdlora.training.config import TrainConfig
from mdlora.training.data.splits import stratified_domain_split
from mdlora.training.loop import Phase, PhaseResult

#: the rows a phase trains on, as ``PhaseResult.rows`` says them
ROWS_ALL, ROWS_BACKBONE, ROWS_FRESH = "all", "backbone slice", "fresh slice"
#: seed offset of the fresh slice (so it is not the validation split's draw)
FRESH_SEED_OFFSET = 104_729


def fresh_split(
    arrays: LabeledArrays, fraction: float, seed: int, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(backbone_rows, fresh_rows)``: sorted indices of the training rows of each part.

    Per primary-division domain, ``round(n * fraction)`` rows are fresh: with ``order``, the
    domain's rows with the largest order values (ties in random order); without, a random
    sample stratified on the label (``stratified_domain_split``; a domain of fewer than three
    rows stays whole in the backbone part).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    domains = np.asarray(arrays["domains"])[:, 0]
    n = domains.shape[0]
    if order is None:
        backbone, fresh, _ = stratified_domain_split(
            domains, arrays["labels"], (1.0 - fraction, fraction, 0.0), seed + FRESH_SEED_OFFSET
        )
        return backbone, fresh
    order = np.asarray(order, dtype=np.float64)
    if order.shape[0] != n:
        raise ValueError(f"order has {order.shape[0]} values for {n} training rows")
    tiebreak = np.random.RandomState(seed + FRESH_SEED_OFFSET).permutation(n)
    is_fresh = np.zeros(n, dtype=bool)
    for d in np.unique(domains):
        rows = np.flatnonzero(domains == d)
        k = round(rows.size * fraction)
        if k == 0:
            continue
        ranked = rows[np.lexsort((tiebreak[rows], order[rows]))]  # oldest first
        is_fresh[ranked[rows.size - k :]] = True
    return np.flatnonzero(~is_fresh).astype(np.int64), np.flatnonzero(is_fresh).astype(np.int64)


class PhaseRows:
    """The training rows of each phase: all of them, or the backbone / fresh slices."""

    def __init__(
        self, cfg: TrainConfig, arrays: LabeledArrays, batch: EncodedBatch,
        order: np.ndarray | None,
    ) -> None:  # fmt: skip
        self.mode = cfg.adapt_rows
        self.info: dict[str, Any] = {"mode": self.mode, "rows": len(batch)}
        if self.mode != "fresh":
            self.all, self.backbone, self.fresh = batch, batch, batch
            return
        if cfg.adapt_order is not None and order is None:
            raise ValueError(
                f"adapt_order {cfg.adapt_order!r}: the prepared data carries no order column "
                "(prepare_table(order_column=...))"
            )
        # data prepared with an order column still gives a stratified slice unless asked
        use = order if cfg.adapt_order is not None else None
        back, fresh = fresh_split(arrays, cfg.adapt_fraction, cfg.seed, use)
        device = batch.labels.device if batch.labels is not None else batch.sparse.device
        self.all = batch
        self.backbone = batch.select(torch.from_numpy(back).to(device))
        self.fresh = batch.select(torch.from_numpy(fresh).to(device))
        per_domain = np.bincount(np.asarray(arrays["domains"])[fresh, 0])
        self.info.update({
            "fraction": cfg.adapt_fraction,
            "order": cfg.adapt_order or "stratified random sample",
            "backbone_rows": int(back.size), "fresh_rows": int(fresh.size),
            "fresh_rows_per_domain": [int(x) for x in per_domain],
        })  # fmt: skip

    def for_phase(self, phase: Phase) -> tuple[str, EncodedBatch]:
        """What ``phase`` trains on: the backbone slice for phase 1, the fresh slice after."""
        if self.mode != "fresh":
            return ROWS_ALL, self.all
        if phase.kind == "backbone":
            return ROWS_BACKBONE, self.backbone
        return ROWS_FRESH, self.fresh


def joint_phase(cfg: TrainConfig, lr: float) -> Phase:
    """``mlora_joint``'s one phase: backbone and every domain's adapter, from scratch."""
    return Phase(
        name="joint", stage="adapters", groups=["backbone", "experts"],
        epochs=int(cfg.phase_epochs.get("joint", cfg.epochs)),
        lr=float(cfg.phase_lr.get("joint", lr)),
    )  # fmt: skip


def finetune_fresh_phase(cfg: TrainConfig, lr: float) -> Phase:
    """``finetune_fresh``'s second phase: the whole backbone on the fresh slice."""
    return Phase(
        name="finetune", stage="backbone", groups=["backbone"],
        epochs=int(cfg.phase_epochs.get("finetune", cfg.epochs)),
        lr=float(cfg.phase_lr.get("finetune", lr)),
    )  # fmt: skip


# ------------------------------------------------------------------- trajectories
def _auc(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _at(value: float | None, step: int, spe: int) -> str:
    if value is None:
        return "n/a"
    return f"{_auc(value)} @ {step} ({step / max(spe, 1):.2f} ep)"


def trajectory_table(phases: list[PhaseResult]) -> str:
    """Markdown: per phase, its rows and its validation trajectory (mean per-domain AUC x100).

    *start*: before the first step; *1/10 epoch*: after about a tenth of the first epoch;
    *best after start*: the best evaluation other than the start (it may be below the start:
    the phase then keeps its starting weights); *kept*: the weights the phase ended with.
    """
    lines = [
        "| phase | rows | train rows | start | 1/10 epoch | best after start | kept | "
        "evals | epochs |",
        "|---|---|---:|---:|---|---|---|---:|---:|",
    ]
    for p in phases:
        spe = p.steps_per_epoch
        kept = (
            "start"
            if p.best_step == 0 and p.best_epoch == 0
            else _at(p.best_metric, p.best_step, spe)
        )
        every = "epoch" if p.eval_every is None else f"{p.eval_every} steps"
        lines.append(
            f"| {p.name} | {p.rows} | {p.train_rows} | {_auc(p.start_metric)} | "
            f"{_at(p.tenth_metric, p.tenth_step, spe)} | "
            f"{_at(p.best_other_metric, p.best_other_step, spe)} | {kept} | "
            f"{max(len(p.history) - 1, 0)} / {every} | {p.epochs_run} |"
        )
    return "\n".join(lines) + "\n"
