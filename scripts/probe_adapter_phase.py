"""Why MLoRA's adapter phase does not beat Base on MovieLens-1M: train vs validation AUC.

Trains phase 1 (the backbone, early stopping as in ``mdlora reproduce``), then continues
from it without early stopping in three ways, each with a fresh Adam:

* ``adapters``: MLoRA's phase 2 (every domain's adapter, backbone frozen), lr 1e-3;
* ``adapters_lr1e-4``: the same at lr 1e-4;
* ``backbone``: the backbone itself trained further, lr 1e-3 (no adapters).

At fixed steps it records the mean per-domain AUC (the early-stopping metric) on a fixed
200k-row sample of the *training* rows and on the validation split, both in eval mode. If
training AUC rises while validation AUC falls from the first steps, the second phase is
fitting what the backbone's id embeddings memorised of the training rows: no adapter epoch
can then beat the phase-1 model on validation, and early stopping restores it.

    .venv/bin/python scripts/probe_adapter_phase.py [--split gender] [--backbone deepfm]
        [--seed 1] [--threads 1] [--epochs 2]

Writes ``results/reproduce/probe/<split>-<backbone>-s<seed>.json``, which
``mdlora reproduce --report-only`` quotes in docs/results.md. Takes about 3-5 minutes on one
core for DeepFM.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mdlora.models.freeze import set_trainable  # noqa: E402
from mdlora.models.model import MultiDomainModel  # noqa: E402
from mdlora.training.config import config_from_dict  # noqa: E402
from mdlora.training.loop import (  # noqa: E402
    LoopSettings,
    make_adam,
    slices,
    to_batch,
    train_phase,
    validation_metric,
)
from mdlora.training.run import build_model, load_data, plan_phases, resolve_hparams  # noqa: E402

CHECKPOINTS = (100, 300)  # steps within each epoch at which to measure, besides its end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="gender", choices=["gender", "age", "occupation"])
    ap.add_argument("--backbone", default="deepfm")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each continuation")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "ml-1m")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "reproduce" / "probe")
    args = ap.parse_args()
    if not (args.data_dir / "users.dat").is_file():
        sys.exit(f"MovieLens-1M not found in {args.data_dir} (users.dat missing); --data-dir")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    cfg = config_from_dict({
        "name": "probe", "method": "mlora", "backbone": args.backbone, "seed": args.seed,
        "epochs": 10, "progress": False, "out": str(REPO / "runs" / "probe"),
        "data": {"source": "preset", "preset": f"ml1m-mlora-{args.split}",
                 "path": str(args.data_dir), "options": {"seed": 2024}},
    })  # fmt: skip
    prepared = load_data(cfg)
    hp = resolve_hparams(cfg, prepared)
    device = torch.device("cpu")
    train, val = (to_batch(prepared.split(s), device) for s in ("train", "val"))
    gen = torch.Generator().manual_seed(0)
    train_sample = train.select(torch.randperm(len(train), generator=gen)[:200_000])
    settings = LoopSettings(batch_size=hp.batch_size, l2=hp.l2, seed=args.seed, progress=False)

    torch.manual_seed(args.seed)
    model = build_model(cfg, prepared, hp).to(device)
    backbone_phase = plan_phases(model, cfg, hp)[0]
    phase1 = train_phase(model, backbone_phase, train, val, settings)
    start = copy.deepcopy(model.state_dict())
    print(f"phase 1: best epoch {phase1.best_epoch}, val mean AUC {phase1.best_metric:.4f}")

    def measure(m: MultiDomainModel) -> dict[str, float]:
        return {"train_auc": validation_metric(m, train_sample, 0, 16384) or float("nan"),
                "val_auc": validation_metric(m, val, 0, 16384) or float("nan")}  # fmt: skip

    runs: dict[str, list[dict[str, Any]]] = {}
    for name, stage, groups, lr in (
        ("adapters", "adapters", ["experts"], 1e-3),
        ("adapters_lr1e-4", "adapters", ["experts"], 1e-4),
        ("backbone", "backbone", ["backbone"], 1e-3),
    ):
        model.load_state_dict(start)
        model.set_stage(stage)
        opt = make_adam(set_trainable(model, groups), lr)
        torch.manual_seed(args.seed + 1)
        points = [{"epoch": 0, "step": 0, **measure(model)}]
        for epoch in range(1, args.epochs + 1):
            model.train()
            data = train.select(torch.randperm(len(train)))
            steps = (len(data) + hp.batch_size - 1) // hp.batch_size
            for step, b in enumerate(tqdm(slices(data, hp.batch_size), total=steps, leave=False,
                                          desc=f"{name} epoch {epoch}"), 1):  # fmt: skip
                logits = model(b.sparse, b.dense, b.domains, b.multi_hot)
                assert b.labels is not None
                loss = F.binary_cross_entropy_with_logits(logits, b.labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step in CHECKPOINTS or step == steps:
                    points.append({"epoch": epoch, "step": step, **measure(model)})
                    model.train()
        runs[name] = points
        last = points[-1]
        print(f"{name:16s} train AUC {points[0]['train_auc']:.4f} -> {last['train_auc']:.4f}, "
              f"val AUC {points[0]['val_auc']:.4f} -> {last['val_auc']:.4f}")  # fmt: skip

    record = {
        "split": args.split, "backbone": args.backbone, "seed": args.seed,
        "phase1": {"best_epoch": phase1.best_epoch, "epochs_run": phase1.epochs_run,
                   "val_auc": phase1.best_metric},
        "train_sample_rows": len(train_sample), "runs": runs,
        "seconds": round(time.perf_counter() - t_start, 1), "threads": args.threads,
        "command": "scripts/probe_adapter_phase.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.split}-{args.backbone}-s{args.seed}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
