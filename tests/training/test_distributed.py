"""Data-parallel training: two CPU processes (gloo) under torchrun end with identical weights,
and row-level freezing (MoE experts) holds under DDP's gradient all-reduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mdlora.training.distributed import DistContext, pick_device, weight_checksums
from tests.training.helpers import TINY

REPO = Path(__file__).resolve().parents[2]


def test_two_process_gloo_run_keeps_replicas_identical_and_rows_frozen(tmp_path: Path) -> None:
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "ddp", "data": {"source": "synthetic", "options": dict(TINY)},
        "method": "moe", "experts_per_domain": 2, "backbone": "deepfm", "embed_dim": 4,
        "tower": [32, 16], "dropout": 0.1, "lr": 0.003, "batch_size": 512, "epochs": 1,
        "seed": 0, "threads": 1, "export": False, "progress": False,
    }))  # fmt: skip
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mdlora.cli", "train", "--config", str(cfg), f"out={run}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["distributed"] == {"world_size": 2, "replicas_identical": True}

    ckpt = run / "checkpoints"
    backbone = load_file(str(ckpt / "model-00-backbone.safetensors"))
    expert0 = load_file(str(ckpt / "model-01-expert_0.safetensors"))
    for name, before in backbone.items():
        after = expert0[name]
        if name.startswith("tower.banks."):
            assert torch.equal(after[1:], before[1:]), f"{name}: rows of other experts moved"
            if name.endswith(".B"):
                assert not torch.equal(after[0], before[0]), f"{name}: expert 0 did not train"
        else:
            assert torch.equal(after, before), f"{name} changed in the expert:0 phase"


def test_torchrun_with_one_process_trains_on_the_asked_device(
    tmp_path: Path, device: torch.device
) -> None:
    """``torchrun --nproc_per_node 1`` is no job (no process group): it trains on one GPU."""
    cfg = tmp_path / "one.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "one", "data": {"source": "synthetic", "options": dict(TINY)},
        "method": "mlora", "backbone": "deepfm", "embed_dim": 4, "tower": [16], "lr": 0.003,
        "batch_size": 1024, "epochs": 1, "seed": 0, "threads": 1, "export": False,
        "progress": False, "device": device.type,
    }))  # fmt: skip
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "-m", "mdlora.cli", "train", "--config", str(cfg), f"out={run}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["distributed"] == {"world_size": 1, "replicas_identical": True}
    assert (run / "final" / "model.safetensors").is_file()


def test_weight_checksums_see_a_one_bit_change() -> None:
    model = torch.nn.Linear(4, 3)
    before = weight_checksums(model)
    with torch.no_grad():
        w = model.weight.view(-1)
        w[5] = torch.nextafter(w[5], torch.tensor(1.0))
    assert not torch.equal(weight_checksums(model), before)


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_more_processes_than_gpus_fall_back_to_the_cpu_or_say_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    two_on_one = DistContext(rank=0, world_size=2, local_rank=0, local_world_size=2)
    _gpus(monkeypatch, 1)
    with pytest.warns(RuntimeWarning, match=r"2 processes on this node but 1 GPU.*gloo"):
        assert pick_device("auto", two_on_one) == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"--nproc_per_node 1\), or use device=auto"):
        pick_device("cuda", two_on_one)
    assert pick_device("cpu", two_on_one) == torch.device("cpu")
    _gpus(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="names one GPU for all 2 processes"):
        pick_device("cuda:0", DistContext(rank=1, world_size=2, local_rank=1, local_world_size=2))


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    second = DistContext(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert pick_device("auto", second) == torch.device("cuda", 1)
    assert pick_device("cuda", second) == torch.device("cuda", 1)
    # one process (torchrun --nproc_per_node 1, or no torchrun) is no job: the first GPU
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    _gpus(monkeypatch, 0)
    assert pick_device("auto", second) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")
