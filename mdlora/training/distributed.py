"""Data-parallel training under ``torchrun``: process group, model wrapping, small collectives.

``torchrun --nproc_per_node N -m mdlora.cli train --config ...`` sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`init_from_env` turns that into a :class:`DistContext` (gloo on CPU,
nccl on CUDA). Every rank holds the whole (encoded) data and trains on its own shard of each
epoch's permutation; DistributedDataParallel averages gradients, so all ranks keep identical
weights. Evaluation runs on every rank over the whole validation split and rank 0's metric is
broadcast, so early-stopping decisions can never diverge.

Row-level freezing (``expert:<e>``, ``gate_row:<d>``) still holds under DDP: the freezing
hook is a tensor hook on the parameter, which runs when the parameter's gradient is produced
and before it is accumulated into ``.grad``; DDP's reducer fires after accumulation and
all-reduces the already-masked gradient, so the frozen rows' averaged gradient is exactly zero
on every rank (``tests/training/test_distributed.py`` checks the rows stay bit-identical).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel job (``world_size == 1``: no job)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 0  # processes on this node (torchrun's LOCAL_WORLD_SIZE); 0: all

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def pick_device(name: str = "auto", ctx: DistContext = SINGLE) -> torch.device:
    """This rank's device.

    ``auto``: this rank's own GPU when CUDA is present and the node has a GPU for every
    process, else the CPU (with a warning when GPUs are there but too few: NCCL refuses two
    ranks on one GPU, so such a job trains on the CPU with gloo). ``cuda``: this rank's GPU
    (``cuda:<local rank>`` in a job); a job with more processes than GPUs stops with a
    one-line error saying what to change. ``cuda:N`` names one GPU, so only for one process.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = ctx.local_world_size or ctx.world_size
    too_many = ctx.enabled and local > gpus
    if name == "auto":
        if gpus == 0:
            return torch.device("cpu")
        if too_many:
            if ctx.is_main:
                warnings.warn(
                    f"{local} processes on this node but {gpus} GPU(s): NCCL needs one GPU per "
                    "process, so this job trains on the CPU with gloo (start at most "
                    f"{gpus} process(es) per node, torchrun --nproc_per_node {gpus}, to use "
                    "the GPUs)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return torch.device("cpu")
        return torch.device("cuda", ctx.local_rank % gpus)
    device = torch.device(name)
    if device.type == "cuda" and gpus == 0:
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here")
    if device.type == "cuda" and ctx.enabled:
        if too_many:
            raise RuntimeError(
                f"device {name!r} with {local} processes on a node with {gpus} GPU(s): NCCL "
                f"needs one GPU per process; start at most {gpus} (torchrun --nproc_per_node "
                f"{gpus}), or use device=auto or device=cpu to train on the CPU with gloo"
            )
        if device.index is not None:
            raise RuntimeError(
                f"device {name!r} names one GPU for all {ctx.world_size} processes; use "
                "device=cuda (each process takes the GPU of its local rank) or device=auto"
            )
        return torch.device("cuda", ctx.local_rank)
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise RuntimeError(f"device {name!r} was asked for but this machine has {gpus} GPU(s)")
    return device


def init_from_env(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the ``torchrun`` job described by the environment, if any.

    One process (``torchrun --nproc_per_node 1`` or no torchrun) is no job: no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, pick_device(device_name)
    ctx = DistContext(
        int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", "0")),
    )  # fmt: skip
    device = pick_device(device_name, ctx)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return ctx, device


def init_process_group(rank: int, world_size: int, init_method: str) -> DistContext:
    """Join a CPU (gloo) group explicitly (for ``torch.multiprocessing.spawn`` and tests)."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, rank)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext, find_unused: bool = False) -> nn.Module:
    """The module to call in a training step: DDP over ``model`` in a job, else ``model``.

    Build a new wrapper for every phase: DDP fixes the set of trainable parameters when it is
    constructed, and each phase unfreezes a different set.
    """
    if not ctx.enabled:
        return model
    device_ids = [model_device(model)] if model_device(model).type == "cuda" else None
    # Buffers (norm statistics, gate masks) are synced from rank 0 at every forward (default).
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused
    )


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def broadcast_float(value: float, ctx: DistContext, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a tensor collective, no pickling)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def weight_checksums(model: nn.Module) -> torch.Tensor:
    """One int64 per tensor of ``model``'s state: the sum of its raw bits (cheap to gather)."""
    sums = []
    for t in model.state_dict().values():
        flat = t.detach().contiguous().view(-1)
        if flat.is_floating_point() and flat.element_size() == 4:
            bits = flat.view(torch.int32).to(torch.int64)
        elif flat.is_floating_point():
            bits = flat.double().view(torch.int64)
        else:
            bits = flat.to(torch.int64)
        sums.append(bits.sum())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def replicas_identical(model: nn.Module, ctx: DistContext) -> bool:
    """Whether every rank holds bit-identical weights (always true outside a job)."""
    if not ctx.enabled:
        return True
    mine = weight_checksums(model).to(model_device(model))
    gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
