"""The training loop of one phase, prediction, and the pieces they share.

A *phase* names which stage the model runs in (``model.set_stage``), which parameter groups
train (``mdlora.models.freeze.set_trainable``), and which rows it trains and validates on. Every
phase of every method runs through :func:`train_phase`: a fresh Adam (no weight decay, so
row-frozen tensors stay bit-identical), an explicit L2 loss term on the embeddings and the
linear / cross parts, early stopping on the mean per-domain validation AUC (once per epoch,
or every ``eval_every`` steps; patience counts evaluations), and the best evaluation's weights
restored at the end. Each phase also looks at validation once after about a tenth of its
first epoch (recorded, not used for stopping), so a report can tell a phase that loses AUC from
its first steps from one that overfits later.

Data is tensorised once (a whole split as one :class:`EncodedBatch` on the device); an epoch
is one permutation gather followed by slices, so a step costs the model and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from mdlora.formats.encoder import LabeledArrays
from mdlora.models.features import EncodedBatch
from mdlora.models.freeze import set_trainable, trainable_parameter_count
from mdlora.models.layers import CrossNet
from mdlora.models.model import MultiDomainModel
from mdlora.models.norm import DomainBatchNorm
from mdlora.training.data.dataset import shard_indices
from mdlora.training.distributed import SINGLE, DistContext, broadcast_float, wrap
from mdlora.training.evaluate import compute_metrics


@dataclass
class Phase:
    """One training phase: the stage to run, the groups that train, the rows it uses."""

    name: str  # e.g. "backbone", "adapters", "expert:3", "gate", "lora:gender", "fusion"
    stage: str
    groups: list[str]
    expert: int | None = None  # "expert" stage
    division: str | None = None  # "lora" stage
    domains: list[int] | None = None  # train/validate on these domains only (None: all)
    metric_column: int = 0  # domains column of ``domains`` and of the early-stopping AUCs
    epochs: int = 10
    lr: float = 1e-3

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]


@dataclass
class LoopSettings:
    batch_size: int = 1024
    l2: float = 1e-5
    patience: int = 3
    seed: int = 2024
    amp: bool = False
    eval_batch_size: int = 16384
    progress: bool = True
    eval_every: int | None = None  # validate every N optimiser steps (None: once per epoch)


@dataclass
class PhaseResult:
    name: str
    epochs_run: int
    best_epoch: int  # 1-based; 0 when no epoch improved on the starting point
    best_metric: float | None
    history: list[float | None] = field(default_factory=list)
    trainable: int = 0
    seconds: float = 0.0  # the whole phase, validation included
    train_seconds: float = 0.0  # optimisation steps only
    samples_per_second: float = 0.0  # training samples (all ranks) per train_seconds
    # ---- the validation trajectory (``history`` holds the scheduled evaluations' values)
    steps_per_epoch: int = 0
    eval_every: int | None = None  # None: once per epoch
    start_metric: float | None = None  # before the first step
    tenth_step: int = 0  # the step of the tenth-of-an-epoch look (0: none)
    tenth_metric: float | None = None  # validation after about a tenth of the first epoch
    best_step: int = 0  # the step of ``best_metric`` (0: the start)
    best_other_metric: float | None = None  # best validation after the start (start excluded)
    best_other_step: int = 0
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # step, epoch, auc, kind
    # ---- the rows the phase trained on (set by the run: "all", "backbone slice", "fresh")
    rows: str = "all"
    train_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------- data
def to_batch(arrays: LabeledArrays, device: torch.device) -> EncodedBatch:
    """A whole split as one :class:`EncodedBatch` on ``device`` (converted once)."""
    return EncodedBatch.from_arrays(
        arrays["sparse"], arrays["dense"], arrays["domains"], arrays.get("multi_hot"),
        arrays["labels"], device=device,
    )  # fmt: skip


def rows_of_domains(batch: EncodedBatch, domains: list[int] | None, column: int = 0) -> Tensor:
    """Row indices of ``batch`` whose domain (in ``column``) is one of ``domains``."""
    col = batch.domains[:, column]
    if domains is None:
        return torch.arange(len(batch), device=col.device)
    wanted = torch.as_tensor(domains, device=col.device)
    return torch.isin(col, wanted).nonzero().squeeze(1)


def slices(batch: EncodedBatch, size: int) -> Iterator[EncodedBatch]:
    """Consecutive ``size``-row views of ``batch`` (no copies)."""
    for start in range(0, len(batch), size):
        stop = start + size
        yield EncodedBatch(
            batch.sparse[start:stop], batch.dense[start:stop], batch.domains[start:stop],
            None if batch.multi_hot is None else batch.multi_hot[start:stop],
            None if batch.labels is None else batch.labels[start:stop],
        )  # fmt: skip


@torch.inference_mode()
def predict(model: MultiDomainModel, batch: EncodedBatch, batch_size: int = 16384) -> np.ndarray:
    """Click probabilities for every row of ``batch`` (eval mode; the model's stage).

    Each slice goes to the model's device first (a no-op when it is already there), so a
    CPU batch scores on a CUDA model and the other way round.
    """
    was_training = model.training
    model.eval()
    device = model.device
    out = [model.score_batch(b.to(device)).float() for b in slices(batch, batch_size)]
    model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def validation_metric(
    model: MultiDomainModel, batch: EncodedBatch, column: int, batch_size: int
) -> float | None:
    """Unweighted mean of the per-domain AUCs of ``batch`` under the domains in ``column``."""
    if len(batch) == 0:
        return None
    probs = predict(model, batch, batch_size)
    assert batch.labels is not None
    ids = batch.domains[:, column].cpu().numpy()
    names = [str(i) for i in range(int(ids.max()) + 1)]
    return compute_metrics(batch.labels.cpu().numpy(), probs, ids, names).mean_auc


# ------------------------------------------------------------------------- training
def l2_parameters(model: MultiDomainModel) -> list[Tensor]:
    """Tensors under the explicit L2 term: embeddings, first-order (linear) weights, cross kernels.

    As DeepCTR-Torch's ``l2_reg_embedding`` / ``l2_reg_linear`` / ``l2_reg_cross``; the DNN
    tower and the adapters have none.
    """
    params: list[Tensor] = [model.embedding.weight]
    if model.linear is not None:
        params.append(model.linear.weight)
    if model.dense_linear is not None:
        params.append(model.dense_linear.weight)
    params += [m.kernels for m in model.interaction.modules() if isinstance(m, CrossNet)]
    return params


def freeze_frozen_norm_statistics(model: nn.Module) -> None:
    """Put norm layers whose affine parameters are all frozen in eval mode.

    A frozen phase must not move running statistics either: a shared batch norm in a frozen
    tower, or a domain norm set the phase does not train, keeps its buffers bit-identical.
    """
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, DomainBatchNorm)):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of what a phase can change: its trainable parameters and every buffer."""
    state = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    state.update({k: b.detach().clone() for k, b in model.named_buffers()})
    return state


@torch.no_grad()
def _restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    current: dict[str, Tensor] = dict(model.named_parameters())
    current.update(dict(model.named_buffers()))
    for k, v in state.items():
        current[k].copy_(v)


def make_adam(
    params: list[nn.Parameter], lr: float, l2: float = 0.0, l2_params: Sequence[Tensor] = ()
) -> torch.optim.Adam:
    """Adam; the fused kernel where this torch has one for the device.

    ``l2_params`` (a subset of ``params``) take the L2 term ``l2 * sum(p**2)`` as Adam's
    coupled weight decay: the step adds its gradient ``2 * l2 * p`` to theirs, which is the
    gradient the explicit term gives, without its dozen kernels a step. Only for whole
    tensors: a row-masked one (``models.freeze``) keeps the explicit term, whose gradient its
    hook masks; decay added in the step would move its frozen rows. Every other parameter
    has no decay.

    Fused Adam is about 3x faster than ``foreach`` on CPU. It does not bump the tensors'
    version counters, which the model's inference-bank cache keys on; the model drops that
    cache on every ``train()`` / ``eval()``, and validation always goes through ``eval()``.
    """
    decayed = {id(p) for p in l2_params} if l2 > 0 else set()
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if id(p) not in decayed]},
        {"params": [p for p in params if id(p) in decayed], "weight_decay": 2 * l2},
    ]
    groups = [g for g in groups if g["params"]] or [{"params": params}]
    device = params[0].device.type if params else "cpu"
    if device in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(groups, lr=lr, fused=True)
        except RuntimeError:  # a torch without the fused kernel for this device (CPU < 2.4)
            pass
    return torch.optim.Adam(groups, lr=lr, foreach=True)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_phase(
    model: MultiDomainModel,
    phase: Phase,
    train: EncodedBatch,
    val: EncodedBatch,
    settings: LoopSettings,
    ctx: DistContext = SINGLE,
    phase_index: int = 0,
) -> PhaseResult:
    """Train one phase with early stopping; the model ends with the best epoch's weights.

    ``train``/``val`` are whole splits on the model's device; the phase's ``domains`` select
    its rows. The starting point counts as epoch 0 (step 0): a phase that never improves the
    validation metric leaves the model exactly as it was. ``settings.eval_every`` validates
    every N steps (and at the phase's last step) instead of at each epoch's end.
    """
    device = model.device
    model.set_stage(phase.stage, expert=phase.expert, division=phase.division)
    params = set_trainable(model, phase.groups)
    if not params:
        raise ValueError(f"phase {phase.name!r}: groups {phase.groups} select no parameters")
    trainable = trainable_parameter_count(model)
    l2_params = [p for p in l2_parameters(model) if p.requires_grad] if settings.l2 > 0 else []
    # whole tensors take the L2 term as Adam's weight decay (make_adam); row-masked ones keep
    # the explicit term, whose gradient their hook masks
    reg = [p for p in l2_params if hasattr(p, "_mdlora_rows")]
    column = phase.metric_column
    train_rows = rows_of_domains(train, phase.domains, column)
    val_part = val.select(rows_of_domains(val, phase.domains, column))
    unused = phase.stage == "fusion" and model.config.fusion != "attention"
    net = wrap(model, ctx, find_unused=unused)
    # A fresh optimiser per phase and no weight decay: the row hooks then keep every frozen row
    # bit-identical (models.freeze).
    opt = make_adam(
        params, phase.lr, settings.l2, [p for p in l2_params if not hasattr(p, "_mdlora_rows")]
    )
    use_amp = settings.amp
    scaler = torch.amp.GradScaler("cuda") if use_amp and device.type == "cuda" else None
    torch.manual_seed(settings.seed + 7919 * phase_index)

    def metric() -> float | None:
        m = validation_metric(model, val_part, column, settings.eval_batch_size)
        value = broadcast_float(math.nan if m is None else m, ctx, device)
        return None if math.isnan(value) else value

    best = metric()
    best_state = _snapshot(model)
    best_epoch, best_step, bad, history = 0, 0, 0, [best]
    n_local = math.ceil(len(train_rows) / ctx.world_size)
    per_rank_batch = max(1, settings.batch_size // ctx.world_size)
    steps = math.ceil(n_local / per_rank_batch)
    every = settings.eval_every
    last_step = steps * phase.epochs
    # the tenth-of-an-epoch look: recorded in the trajectory, never used for stopping/restore
    # unless it coincides with a scheduled evaluation
    tenth = max(1, round(steps / 10)) if steps else 0
    trajectory: list[dict[str, Any]] = [{"step": 0, "epoch": 0.0, "auc": best, "kind": "start"}]
    tenth_metric: float | None = None
    show = settings.progress and ctx.is_main
    t0, seen, epochs_run, train_seconds = time.perf_counter(), 0, 0, 0.0
    step, stop = 0, False

    def scheduled(at: int, epoch_end: bool) -> bool:
        if every is None:
            return epoch_end
        return at % every == 0 or at == last_step

    def evaluate(at: int, epoch: int, kind: str) -> float | None:
        """One validation at step ``at``; the training mode (and frozen norms) come back."""
        value = metric()
        model.train()
        freeze_frozen_norm_statistics(model)
        trajectory.append({"step": at, "epoch": round(at / max(steps, 1), 4), "auc": value,
                           "kind": kind})  # fmt: skip
        if show and kind != "epoch":
            shown = "n/a" if value is None else f"{value:.4f}"
            tqdm.write(f"  {phase.name} step {at} (epoch {at / max(steps, 1):.2f}, {kind}): "
                       f"val mean AUC {shown}")  # fmt: skip
        return value

    def consider(value: float | None, epoch: int, at: int) -> bool:
        """Early stopping bookkeeping of one scheduled evaluation; True: stop the phase."""
        nonlocal best, best_state, best_epoch, best_step, bad
        history.append(value)
        if value is not None and (best is None or value > best):
            best, best_epoch, best_step, bad = value, epoch, at, 0
            best_state = _snapshot(model)
            return False
        bad += 1
        return bad >= settings.patience

    for epoch in range(1, phase.epochs + 1):
        epochs_run = epoch
        model.train()
        freeze_frozen_norm_statistics(model)
        t_epoch, eval_seconds = time.perf_counter(), 0.0
        order = shard_indices(
            len(train_rows), shuffle=True, seed=settings.seed + 1009 * phase_index,
            epoch=epoch, rank=ctx.rank, world_size=ctx.world_size,
        )  # fmt: skip
        data = train.select(train_rows[torch.from_numpy(order).to(device)])
        bar = tqdm(
            slices(data, per_rank_batch), total=steps, leave=False, mininterval=0.5,
            desc=f"{phase.name} epoch {epoch}/{phase.epochs}",
            disable=not show,
        )  # fmt: skip
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(bar, start=1):
            with _autocast(device, use_amp):
                logits = net(b.sparse, b.dense, b.domains, b.multi_hot)
            assert b.labels is not None
            loss = F.binary_cross_entropy_with_logits(logits.float(), b.labels)
            loss_sum += loss.detach()
            if reg:
                loss = loss + settings.l2 * sum(p.square().sum() for p in reg)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            step += 1
            is_scheduled = every is not None and scheduled(step, i == steps)
            # per epoch, a tenth that is the epoch's end is the end-of-epoch evaluation
            probe = step == tenth and not (every is None and i == steps)
            if probe or is_scheduled:
                t_eval = time.perf_counter()
                value = evaluate(step, epoch, "eval" if is_scheduled else "tenth")
                if step == tenth:
                    tenth_metric = value
                stop = is_scheduled and consider(value, epoch, step)
                eval_seconds += time.perf_counter() - t_eval
                if stop:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - t_epoch - eval_seconds
        seen += len(data) if not stop else min(len(data), i * per_rank_batch)
        if every is None and not stop:
            value = evaluate(step, epoch, "epoch")
            if show:
                shown = "n/a" if value is None else f"{value:.4f}"
                tqdm.write(
                    f"  {phase.name} epoch {epoch}: train loss "
                    f"{loss_sum.item() / max(steps, 1):.4f}, val mean AUC {shown}"
                )
            if step == tenth:
                tenth_metric = value
            stop = consider(value, epoch, step)
        if stop:
            break
    _restore(model, best_state)
    seconds = time.perf_counter() - t0
    others = [t for t in trajectory if t["kind"] != "start" and t["auc"] is not None]
    top = max(others, key=lambda t: t["auc"], default=None)
    return PhaseResult(
        name=phase.name, epochs_run=epochs_run, best_epoch=best_epoch, best_metric=best,
        history=history, trainable=trainable, seconds=seconds, train_seconds=train_seconds,
        samples_per_second=seen * ctx.world_size / train_seconds if train_seconds > 0 else 0.0,
        steps_per_epoch=steps, eval_every=every, start_metric=trajectory[0]["auc"],
        tenth_step=tenth, tenth_metric=tenth_metric, best_step=best_step,
        best_other_metric=None if top is None else top["auc"],
        best_other_step=0 if top is None else int(top["step"]),
        trajectory=trajectory, train_rows=len(train_rows),
    )  # fmt: skip
