"""Data-parallel training: two CPU processes (gloo) under torchrun end with identical weights,
and row-level freezing (MoE experts) holds under DDP's gradient all-reduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.training.helpers import TINY
from training.distributed import weight_checksums

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
         "-m", "training", "train", "--config", str(cfg), f"out={run}"],
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


def test_weight_checksums_see_a_one_bit_change() -> None:
    model = torch.nn.Linear(4, 3)
    before = weight_checksums(model)
    with torch.no_grad():
        w = model.weight.view(-1)
        w[5] = torch.nextafter(w[5], torch.tensor(1.0))
    assert not torch.equal(weight_checksums(model), before)
