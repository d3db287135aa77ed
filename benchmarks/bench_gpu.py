"""The GPU benchmark: routing, training and serving on one CUDA device, in one run (< 5 min).

Everything is measured side by side in this run, on the same GPU:

1. routing (``bench_routing``'s DeepFM models, MovieLens vocabularies, tower 256-128-64):
   one mixed-domain batch of 65,536 rows over 21 and 200 skewed domains, the model's
   default routing on CUDA (``merged``, which runs as the segmented tower there: one grouped
   Triton kernel per layer, ``mdlora.models.grouped``) against the bare backbone, for MLoRA
   and MoE-MLoRA (one expert per domain), timed interleaved with CUDA syncs; the same
   default with the kernel off (``default,eager``: batched GEMMs over gathered weights, the
   path measured below; ``*_eager_over_backbone_cuda_*``) and other strategies are printed
   for reference (``grouped_kernel`` in the JSON says whether the kernels were usable at the
   start, ``grouped_kernel_off`` why they were turned off during the run, if they were);
2. training (ML-1M gender, DeepFM, MLoRA, batch 1024, one epoch per phase): samples/s of
   phase 1 (backbone) and phase 2 (adapters) from the trainer's own per-phase counters; the
   real ML-1M at ``../shared/data/ml-1m`` when present, else a generated look-alike of its
   size (``write_movielens_1m_like``: 6,040 users, 3,706 movies, 1,000,209 ratings);
   DeepCTR-Torch's DeepFM ``fit`` on the same rows, GPU and batch when ``deepctr_torch``
   imports (``ours_over_deepctr_cuda``: our phase 1 over it), else null with the reason;
3. serving: ``bench_service.py --quick --device cuda`` (service and in-process scorer both on
   the GPU), its ``service_over_inprocess`` with the service's default (on a GPU, model
   calls on a scorer thread) and, as ``service_over_inprocess_cuda_inline``, with model calls
   on the event loop (``--scorer-thread off``).

Prints tables, then, LAST, one JSON line. ``--quick``: smaller batches, fewer rounds, a
quarter of the rows, no service run (under a minute). On a machine without CUDA it says so
and prints a JSON line of nulls.

    python benchmarks/bench_gpu.py [--quick] [--skip-service] [--skip-deepctr]
                                   [--routing-only] [--profile]

Measured on one H200 (torch 2.11, CUDA 13; December; one run each, ML-1M look-alike): routing
default over backbone at 65,536 rows 2.38x / 2.63x (MLoRA, 21 / 200 domains) and 2.50x /
2.76x (MoE); an earlier run, before the layout stopped syncing with the host, gave 2.73x /
2.51x and 2.73x / 2.14x (so two runs differ by up to ~0.6x: one run is no verdict on the
fix); the per-sample ``gather`` 3.1-4.1x, embedding_bag 5-6.6x; training 300,949 /
235,906 samples/s (phase 1 / 2), DeepCTR-Torch 64,895 (4.64x); service over in-process 0.47.
``--profile`` put the layout itself at 0.36-0.63 ms and the per-block weight gathers at
~0.2 ms of the ~0.6-0.8 ms the segmented tower adds: the targets (1.5x MLoRA, 2x MoE) need a
grouped GEMM that reads each block's weights in place (a Triton kernel), not eager ops.
That kernel is now the default on CUDA (December 7); no GPU has timed it yet.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_routing import make_model  # noqa: E402

from mdlora.models import grouped  # noqa: E402
from mdlora.models.features import EncodedBatch  # noqa: E402
from mdlora.models.model import MultiDomainModel  # noqa: E402

ML1M = REPO / ".." / "shared" / "data" / "ml-1m"
BATCH = 65_536
DOMAINS = (21, 200)
#: strategies timed for reference beside the default (MoE's folded adapters are full rank:
#: ``gather`` would copy rank x (in + out) floats per sample and ``fused_down`` multiply by
#: every domain's full-rank A, gigabytes at this batch)
STRATEGIES = {"mlora": ("segment", "gather", "bag", "fused_down"),
              "moe": ("segment", "bag", "mixture")}  # fmt: skip


# ------------------------------------------------------------------------------- routing
def make_batch(n: int, n_domains: int, device: torch.device, seed: int = 0) -> EncodedBatch:
    """``n`` rows over ``n_domains`` with a Zipf-like skew (as ``bench_routing``)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, n_domains + 1, dtype=torch.float)
    domain = torch.multinomial(weights, n, replacement=True, generator=g)
    sparse = torch.stack(
        [torch.randint(1, 6041, (n,), generator=g),
         torch.randint(1, 3707, (n,), generator=g), domain + 1], 1,
    )  # fmt: skip
    return EncodedBatch(sparse, torch.zeros(n, 0), domain.unsqueeze(1)).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_time(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call (each call synchronised), candidates interleaved."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    sync(device)
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync(device)
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def scorer(model: MultiDomainModel, batch: EncodedBatch) -> Callable[[], object]:
    return lambda: model.score_batch(batch, check=False)


def without_grouped(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the grouped Triton kernel off (the segmented tower's eager path)."""

    def call() -> object:
        was, grouped.ENABLED = grouped.ENABLED, False
        try:
            return fn()
        finally:
            grouped.ENABLED = was

    return call


def bench_routing(device: torch.device, batch_size: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print(f"routing: DeepFM, batch {batch_size}, median of {rounds} synchronised calls")
    print(f"{'domains':>7} {'mode':6} {'strategy':12} {'ms':>8} {'x backbone':>10}")
    with torch.inference_mode():
        for n in DOMAINS:
            batch = make_batch(batch_size, n, device)
            base = make_model("deepfm", "base", n).to(device)
            for mode, method in (("mlora", "mlora"), ("moe", "moe")):
                model = make_model("deepfm", method, n).to(device)
                fns: dict[str, Callable[[], object]] = {
                    "backbone": scorer(base, batch), "default": scorer(model, batch),
                    "eager": without_grouped(scorer(model, batch)),
                }  # fmt: skip
                for s in STRATEGIES[mode]:
                    clone = make_model("deepfm", method, n).to(device)
                    clone.load_state_dict(model.state_dict())
                    clone.set_routing(s)
                    fns[s] = scorer(clone, batch)
                t = cuda_time(fns, rounds, device)
                for name in ("backbone", "default", "eager", *STRATEGIES[mode]):
                    label = {"default": "default=" + model.routing[0],
                             "eager": "default,eager"}.get(name, name)  # fmt: skip
                    print(f"{n:7d} {mode:6} {label:12} {t[name] * 1e3:8.3f} "
                          f"{t[name] / t['backbone']:10.2f}")  # fmt: skip
                out[f"{mode}_over_backbone_cuda_{n}"] = round(t["default"] / t["backbone"], 3)
                out[f"{mode}_eager_over_backbone_cuda_{n}"] = round(t["eager"] / t["backbone"], 3)
                best = min(STRATEGIES[mode], key=t.__getitem__)
                out[f"{mode}_best_strategy_cuda_{n}"] = best
                out[f"{mode}_best_over_backbone_cuda_{n}"] = round(t[best] / t["backbone"], 3)
                out[f"backbone_ms_cuda_{n}"] = round(t["backbone"] * 1e3, 4)
                del model, fns
            del base
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def profile_segment(device: torch.device, batch_size: int) -> dict[str, Any]:
    """Where the segmented default's time goes: the layout alone, each block size, and the
    profiler's top CUDA kernels (``--profile``)."""
    import mdlora.models.lora as lora
    from mdlora.models.lora import SegmentPlan

    out: dict[str, Any] = {}
    chosen = lora.segment_block
    with torch.inference_mode():
        for n in DOMAINS:
            batch = make_batch(batch_size, n, device)
            index = batch.domains[:, 0]
            base = make_model("deepfm", "base", n).to(device)
            model = make_model("deepfm", "mlora", n).to(device)
            fns: dict[str, Callable[[], object]] = {"backbone": scorer(base, batch)}
            fns["plan"] = functools.partial(SegmentPlan, index, n)  # the Triton layout if any
            fns["plan,eager"] = without_grouped(functools.partial(SegmentPlan, index, n))
            for block in (32, 64, 128, 256):
                clone = make_model("deepfm", "mlora", n).to(device)
                clone.load_state_dict(model.state_dict())
                clone.set_routing("segment")

                def call(
                    clone: MultiDomainModel = clone, block: int = block, batch: EncodedBatch = batch
                ) -> object:
                    lora.segment_block = lambda rows, domains: block  # type: ignore[assignment]
                    try:
                        return clone.score_batch(batch, check=False)
                    finally:
                        lora.segment_block = chosen

                fns[f"block{block}"] = call
            t = cuda_time(fns, 20, device)
            print(f"profile, {n} domains: " + ", ".join(
                f"{k} {v * 1e3:.3f} ms" for k, v in t.items()))  # fmt: skip
            out[f"profile_ms_{n}"] = {k: round(v * 1e3, 4) for k, v in t.items()}
            if device.type == "cuda":
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        model.score_batch(batch, check=False)
                    sync(device)
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14))
    return out


# ------------------------------------------------------------------------------ training
def ml1m_folder(tmp: Path, quick: bool) -> tuple[Path, str]:
    if (ML1M / "ratings.dat").is_file():
        return ML1M.resolve().parent, "MovieLens-1M"
    from mdlora.training.data.synthetic import write_movielens_1m_like

    scale = 4 if quick else 1
    write_movielens_1m_like(tmp / "ml-1m", n_users=6040, n_movies=3706,
                            n_ratings=1_000_209 // scale, seed=0)  # fmt: skip
    return tmp, f"generated ML-1M look-alike ({1_000_209 // scale} ratings; not MovieLens)"


#: rows each library trains on, untimed, before its timed epoch
WARM_UP_ROWS = 20_480


def bench_training(device: torch.device, tmp: Path, quick: bool, deepctr: bool) -> dict[str, Any]:
    from mdlora.training.config import config_from_dict
    from mdlora.training.data.presets import mlora_setting
    from mdlora.training.run import run_training

    parent, source = ml1m_folder(tmp, quick)
    t0 = time.perf_counter()
    prepared = mlora_setting(parent / "ml-1m", "gender")
    print(f"training data: {source}, gender split, {len(prepared.train['labels'])} training "
          f"rows (prepared in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    # untimed first: a GPU's first calls load kernels and create library handles; the
    # DeepCTR-Torch worker below gets the same warm-up (--warmup-rows)
    run_training(config_from_dict({
        "name": "bench-gpu-warm-up",
        "data": {"source": "synthetic", "options": {"n_rows": WARM_UP_ROWS}},
        "method": "mlora", "backbone": "deepfm", "epochs": 1, "patience": 1, "seed": 0,
        "progress": False, "export": False, "device": str(device), "out": str(tmp / "warm"),
    }))  # fmt: skip
    cfg = config_from_dict({
        "name": "bench-gpu", "data": {"source": "preset", "preset": "ml1m-mlora-gender",
                                      "path": str(parent / "ml-1m")},
        "method": "mlora", "backbone": "deepfm", "epochs": 1, "patience": 1, "seed": 0,
        "progress": False, "export": False, "device": str(device), "out": str(tmp / "run"),
    })  # fmt: skip
    result = run_training(cfg, prepared=prepared)
    phases = {p.name: p for p in result.phases}
    out: dict[str, Any] = {
        "train_data": source,
        "train_samples_per_s_cuda": {
            "phase1_backbone": round(phases["backbone"].samples_per_second),
            "phase2_adapters": round(phases["adapters"].samples_per_second),
        },
        "train_batch_size": result.hparams.batch_size,
        "train_warm_up": f"both libraries trained {WARM_UP_ROWS} rows untimed first",
    }
    for p in result.phases:
        print(f"  ours, {p.name}: {p.samples_per_second:,.0f} samples/s "
              f"({p.train_seconds:.2f} s of steps, {p.epochs_run} epoch)")  # fmt: skip
    out["ours_over_deepctr_cuda"] = None
    if not deepctr:
        out["deepctr_note"] = "skipped (--skip-deepctr)"
        return out
    folder = tmp / "deepctr"
    folder.mkdir()
    # the same rows as our training split: user id, movie id, gender (three sparse fields)
    np.save(folder / "sparse.npy", np.ascontiguousarray(prepared.train["sparse"], np.int64))
    np.save(folder / "labels.npy", np.ascontiguousarray(prepared.train["labels"], np.float32))
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_training_throughput.py"),
           "--worker", "deepctr", "--backbone", "deepfm", "--data", str(folder),
           "--threads", "4", "--device", str(device),
           "--warmup-rows", str(WARM_UP_ROWS)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        out["deepctr_note"] = f"DeepCTR-Torch did not run here: {reason}"
        print(f"  {out['deepctr_note']}")
        return out
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = phases["backbone"].samples_per_second / theirs["samples_per_second"]
    print(f"  DeepCTR-Torch DeepFM fit: {theirs['samples_per_second']:,.0f} samples/s "
          f"({theirs['seconds']:.2f} s); ours (phase 1) over it: {ratio:.2f}x")  # fmt: skip
    out["deepctr_samples_per_s_cuda"] = round(theirs["samples_per_second"])
    out["ours_over_deepctr_cuda"] = round(ratio, 3)
    return out


# ------------------------------------------------------------------------------- service
def _service_run(device: torch.device, scorer_thread: str) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_service.py"), "--quick",
           "--device", str(device), "--scorer-thread", scorer_thread]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=200)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        print(f"service benchmark ({scorer_thread}) failed: {reason}")
        return {"error": reason}
    for line in lines[:-1]:
        print(f"  {line}")
    return dict(json.loads(lines[-1]))


def bench_service(device: torch.device) -> dict[str, Any]:
    """The service's default (on a GPU: model calls on a scorer thread), then model calls on
    the event loop (``MDLORA_SCORER_THREAD=false``) for comparison."""
    res = _service_run(device, "auto")
    if "error" in res:
        return {"service_over_inprocess_cuda": None, "service_note": res["error"]}
    out = {
        "service_over_inprocess_cuda": res["service_over_inprocess"],
        "service_scorer_thread_cuda": res["scorer_thread"],
        "service_p99_ms_half_load_cuda": res["p99_ms_half_load"],
        "service_p99_swap_over_steady_cuda": res["p99_swap_over_steady"],
        "service_errors_cuda": res["errors"],
    }
    inline = _service_run(device, "off")
    out["service_over_inprocess_cuda_inline"] = inline.get("service_over_inprocess")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    ap.add_argument("--skip-service", action="store_true", help="no service benchmark")
    ap.add_argument("--skip-deepctr", action="store_true", help="no DeepCTR-Torch run")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    ap.add_argument("--routing-only", action="store_true", help="no training or service runs")
    ap.add_argument("--profile", action="store_true",
                    help="only the segmented routing's breakdown (layout, block sizes, kernels)")
    args = ap.parse_args()
    keys = ["mlora_over_backbone_cuda_21", "mlora_over_backbone_cuda_200",
            "moe_over_backbone_cuda_21", "moe_over_backbone_cuda_200",
            "train_samples_per_s_cuda", "ours_over_deepctr_cuda", "service_over_inprocess_cuda"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure")
        print(json.dumps({**dict.fromkeys(keys), "device": None}))
        return
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)"
    print(f"device: {name}, torch {torch.__version__}")
    results: dict[str, Any] = {"device": name}
    results["grouped_kernel"] = grouped.runs_on(device)
    batch = 8192 if args.quick else BATCH
    if args.profile:
        results.update(profile_segment(device, batch))
        print(json.dumps({**results, "grouped_kernel_off": grouped.BROKEN}))
        return
    results.update(bench_routing(device, batch, 3 if device.type == "cpu" else
                                 10 if args.quick else 40))  # fmt: skip
    results["routing_batch"] = batch
    if args.routing_only:
        print(json.dumps({**results, "grouped_kernel_off": grouped.BROKEN}))
        return
    with tempfile.TemporaryDirectory(prefix="mdlora-bench-gpu-") as tmp:
        results.update(bench_training(device, Path(tmp), args.quick, not args.skip_deepctr))
    if args.quick or args.skip_service:
        results["service_over_inprocess_cuda"] = None
        results["service_note"] = "skipped (--quick or --skip-service)"
    else:
        results.update(bench_service(device))
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps({**results, "grouped_kernel_off": grouped.BROKEN}))


if __name__ == "__main__":
    main()
