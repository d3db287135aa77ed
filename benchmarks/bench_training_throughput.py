"""Training throughput: our phase loop against DeepCTR-Torch, same data, DeepFM and DCN.

One epoch over the same rows (MovieLens-1M, MLoRA setting, gender split, training part:
user id, movie id and gender as three sparse fields) -- or, without ML-1M, synthetic rows of
the same shape (~600k rows, 3 fields) -- with embedding 8, tower [256, 128, 64], dropout 0.5,
Adam 1e-3, L2 1e-5 on embeddings / linear / cross, batch 1024, for DeepFM and DCN, in both
libraries. Every measurement runs in its own subprocess, one after the other, with the same
torch thread count; each reports samples/second over its training steps and its peak RSS
(``resource.getrusage``).

DeepCTR-Torch lives in its own virtualenv, ``benchmarks/.venv-deepctr`` (created on first use
with ``python -m venv`` and ``pip install torch==<ours> deepctr-torch``; gitignored).

    python benchmarks/bench_training_throughput.py [--threads 2] [--rows N] [--repeats 2]

Prints a table and, as its LAST line, one JSON object with the throughput ratios
``ours_over_deepctr_deepfm`` / ``ours_over_deepctr_dcn`` and each run's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ML1M = REPO / ".." / "shared" / "data" / "ml-1m"
DEEPCTR_VENV = HERE / ".venv-deepctr"
EMBED, TOWER, DROPOUT, LR, L2, BATCH = 8, (256, 128, 64), 0.5, 1e-3, 1e-5, 1024


# ----------------------------------------------------------------------------- data
def write_data(folder: Path, rows: int | None) -> str:
    """Encoded training rows as .npy files (sparse ids [N, 3], labels [N]); returns a label."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    if ML1M.is_dir():
        from mdlora.training.data.presets import mlora_setting

        prepared = mlora_setting(ML1M, "gender", max_rows=None)
        sparse, labels = prepared.train["sparse"], prepared.train["labels"]
        source = f"MovieLens-1M MLoRA setting, gender, train split ({len(labels)} rows)"
        if rows is not None:
            sparse, labels = sparse[:rows], labels[:rows]
            source += f", first {rows} rows"
    else:
        n = rows or 600_000
        rng = np.random.default_rng(0)
        vocab = (6041, 3707, 3)
        sparse = np.stack([rng.integers(1, v, n) for v in vocab], 1).astype(np.int64)
        logit = rng.normal(0, 1, vocab[0])[sparse[:, 0]] + rng.normal(0, 1, vocab[1])[sparse[:, 1]]
        labels = (rng.random(n) < 1 / (1 + np.exp(-(logit - 1.2)))).astype(np.float32)
        source = f"synthetic, {n} rows of 3 sparse fields (ML-1M not found at {ML1M})"
    np.save(folder / "sparse.npy", np.ascontiguousarray(sparse, dtype=np.int64))
    np.save(folder / "labels.npy", np.ascontiguousarray(labels, dtype=np.float32))
    return source


def _load(folder: Path) -> tuple[Any, Any]:
    import numpy as np

    return (np.load(folder / "sparse.npy", allow_pickle=False),
            np.load(folder / "labels.npy", allow_pickle=False))  # fmt: skip


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --------------------------------------------------------------------------- workers
def worker_ours(folder: Path, backbone: str, threads: int) -> dict[str, Any]:
    """One epoch through ``mdlora.training.loop.train_phase`` (the loop every phase uses)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from mdlora.models.features import FeatureSpec, SparseField
    from mdlora.models.model import Division, ModelConfig, MultiDomainModel
    from mdlora.training.loop import LoopSettings, Phase, to_batch, train_phase

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sparse, labels = _load(folder)
    vocab = [int(sparse[:, j].max()) + 1 for j in range(sparse.shape[1])]
    spec = FeatureSpec(sparse=tuple(SparseField(f"f{j}", max(v, 2)) for j, v in enumerate(vocab)))
    n_dom = max(vocab[-1], 2)
    config = ModelConfig(
        features=spec, divisions=(Division("d", tuple(str(i) for i in range(n_dom))),),
        backbone=backbone, embed_dim=EMBED, tower=TOWER, dropout=DROPOUT, method="base",
    )  # fmt: skip
    model = MultiDomainModel(config)
    arrays = {
        "sparse": sparse, "dense": np.zeros((len(labels), 0), np.float32),
        "domains": sparse[:, -1:].copy(), "multi_hot": None, "labels": labels,
    }  # fmt: skip
    train = to_batch(arrays, torch.device("cpu"))  # type: ignore[arg-type]
    val = train.select(torch.arange(min(2048, len(labels))))
    settings = LoopSettings(batch_size=BATCH, l2=L2, patience=1, seed=0, progress=False)
    res = train_phase(model, Phase("backbone", "backbone", ["backbone"], epochs=1, lr=LR),
                      train, val, settings)  # fmt: skip
    return {"samples_per_second": res.samples_per_second, "seconds": res.train_seconds,
            "rows": len(labels), "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


def _no_version_check() -> None:
    """deepctr_torch asks PyPI for its latest version at import (with ``requests``, which it
    does not declare); a stand-in ``requests`` whose calls fail keeps the run offline."""
    import types

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network calls are disabled in this benchmark")

    stub = types.ModuleType("requests")
    stub.get = offline  # type: ignore[attr-defined]
    stub.codes = types.SimpleNamespace(ok=200)  # type: ignore[attr-defined]
    sys.modules.setdefault("requests", stub)


def worker_deepctr(
    folder: Path, backbone: str, threads: int, device: str = "cpu", warmup_rows: int = 0
) -> dict[str, Any]:
    """One epoch of DeepCTR-Torch's own ``fit`` (metrics off, no progress bar) on ``device``;
    ``warmup_rows``: first an untimed ``fit`` on that many rows (a GPU's first calls load
    kernels and create library handles, which a steady-state rate should not count)."""
    _no_version_check()
    import torch
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DCN, DeepFM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sparse, labels = _load(folder)
    cols = [SparseFeat(f"f{j}", int(sparse[:, j].max()) + 1, embedding_dim=EMBED)
            for j in range(sparse.shape[1])]  # fmt: skip
    common = {"dnn_hidden_units": TOWER, "dnn_dropout": DROPOUT, "l2_reg_linear": L2,
              "l2_reg_embedding": L2, "device": device, "seed": 0}  # fmt: skip
    if backbone == "deepfm":
        model = DeepFM(cols, cols, **common)
    else:
        model = DCN(cols, cols, cross_num=2, cross_parameterization="vector", l2_reg_cross=L2,
                    **common)  # fmt: skip
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy", metrics=[])
    x = {f"f{j}": sparse[:, j] for j in range(sparse.shape[1])}
    if warmup_rows > 0:
        head = {k: v[:warmup_rows] for k, v in x.items()}
        model.fit(head, labels[:warmup_rows], batch_size=BATCH, epochs=1, verbose=0)
    t0 = time.perf_counter()
    model.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0, shuffle=True)
    seconds = time.perf_counter() - t0
    return {"samples_per_second": len(labels) / seconds, "seconds": seconds,
            "rows": len(labels), "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


# ---------------------------------------------------------------------------- parent
def ensure_deepctr_venv() -> Path:
    """``benchmarks/.venv-deepctr`` with our torch version and deepctr-torch; its python."""
    python = DEEPCTR_VENV / "bin" / "python"
    probe = [str(python), "-c", "import sys, types; "
             "sys.modules['requests'] = types.ModuleType('requests'); "
             "import deepctr_torch.models, torch; print(torch.__version__)"]  # fmt: skip
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    ours = [sys.executable, "-c", "import torch; print(torch.__version__)"]
    version = subprocess.run(ours, capture_output=True, text=True, check=True).stdout.strip()
    version = version.split("+")[0]
    print(f"creating {DEEPCTR_VENV} (torch=={version} + deepctr-torch) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(DEEPCTR_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={version}", "numpy"], check=True)
    # deepctr-torch's own pins are loose (torch>=2.4, tqdm, scikit-learn); --no-deps keeps the
    # torch above whatever the resolver would prefer
    subprocess.run([*pip, "--no-deps", "deepctr-torch"], check=True)
    subprocess.run([*pip, "tqdm", "scikit-learn"], check=True)
    subprocess.run(probe, check=True, capture_output=True)
    return python


def run_worker(python: Path | str, kind: str, backbone: str, folder: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", kind, "--backbone", backbone,
           "--data", str(folder), "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}/{backbone} worker failed:\n{proc.stderr[-3000:]}")
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    ap.add_argument("--rows", type=int, default=None, help="use only the first N rows")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (library, model); best kept")
    ap.add_argument("--worker", choices=["ours", "deepctr"], help=argparse.SUPPRESS)
    ap.add_argument("--backbone", default="deepfm", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # the deepctr worker's
    ap.add_argument("--warmup-rows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        print(json.dumps({"source": write_data(args.prepare, args.rows)}))
        return
    if args.worker:
        if args.worker == "ours":
            print(json.dumps(worker_ours(args.data, args.backbone, args.threads)))
        else:
            print(json.dumps(worker_deepctr(args.data, args.backbone, args.threads, args.device,
                                            args.warmup_rows)))  # fmt: skip
        return

    deepctr_python = ensure_deepctr_venv()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mdlora-bench-") as tmp:
        folder = Path(tmp)
        # in a subprocess: the parent stays small, and a child's ru_maxrss starts from its
        # parent's peak at fork (Linux keeps it across exec)
        prep = [sys.executable, str(Path(__file__).resolve()), "--prepare", str(folder)]
        if args.rows is not None:
            prep += ["--rows", str(args.rows)]
        done = subprocess.run(prep, capture_output=True, text=True, check=True, cwd=REPO)
        source = json.loads(done.stdout.strip().splitlines()[-1])["source"]
        print(f"data: {source}; batch {BATCH}, embed {EMBED}, tower {list(TOWER)}, "
              f"{args.threads} threads", flush=True)  # fmt: skip
        # interleaved (ours, theirs, ours, theirs, ...) so that drift in the machine's load
        # reaches both libraries alike; the best run of each is kept
        for backbone in ("deepfm", "dcn"):
            for rep in range(args.repeats):
                for kind, python in (("ours", sys.executable), ("deepctr", deepctr_python)):
                    r = run_worker(python, kind, backbone, folder, args.threads)
                    key = f"{kind}_{backbone}"
                    if key not in results or r["samples_per_second"] > results[key][
                        "samples_per_second"
                    ]:
                        results[key] = r
                    print(f"  run {rep + 1}/{args.repeats} {kind:8s} {backbone:7s} "
                          f"{r['samples_per_second']:10.0f} samples/s ({r['seconds']:.1f} s), "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip

    print()
    print("| model | ours samples/s | DeepCTR-Torch samples/s | ratio | ours RSS MB "
          "| DeepCTR RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    summary: dict[str, Any] = {"data": source, "threads": args.threads, "batch_size": BATCH}
    for backbone in ("deepfm", "dcn"):
        ours, theirs = results[f"ours_{backbone}"], results[f"deepctr_{backbone}"]
        ratio = ours["samples_per_second"] / theirs["samples_per_second"]
        print(f"| {backbone} | {ours['samples_per_second']:.0f} | "
              f"{theirs['samples_per_second']:.0f} | {ratio:.2f}x | {ours['peak_rss_mb']:.0f} | "
              f"{theirs['peak_rss_mb']:.0f} |")  # fmt: skip
        summary[f"ours_over_deepctr_{backbone}"] = round(ratio, 3)
        summary[f"ours_{backbone}_samples_per_second"] = round(ours["samples_per_second"])
        summary[f"deepctr_{backbone}_samples_per_second"] = round(theirs["samples_per_second"])
        summary[f"ours_{backbone}_peak_rss_mb"] = round(ours["peak_rss_mb"], 1)
        summary[f"deepctr_{backbone}_peak_rss_mb"] = round(theirs["peak_rss_mb"], 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
