"""Routing benchmark: one mixed-domain batch through adapters vs the bare backbone.

Inference on a batch of 1024 samples spread (skewed) over 21 and 200 domains, for DeepFM and
MLP in the MLoRA MovieLens setting (user id, movie id, domain id; embedding 8; tower
256-128-64; ranks from the published alpha). Modes: MLoRA, MoE-MLoRA with one and with three
experts per domain. Each is timed side by side, interleaved, against

* the same backbone with no adapters (``*_over_backbone``), and
* scoring each domain's samples with a separate call of the same model, as the papers' code
  does (``loop_over_onepass``: per-domain calls / one pass).

Routing strategies are timed too (``bag``, ``fused_down``, ``kernel``, and the per-layer choice by
``tune_routing``); the headline ratios use the tuned choice. Prints a table, then one JSON
line. Run: ``.venv/bin/python benchmarks/bench_routing.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from models.features import EncodedBatch, FeatureSpec, SparseField
from models.model import Division, ModelConfig, MultiDomainModel

BATCH = 1024


def make_model(backbone: str, method: str, n_domains: int, experts: int = 1) -> MultiDomainModel:
    spec = FeatureSpec(
        sparse=(SparseField("user", 6041), SparseField("movie", 3707), SparseField("domain", 201))
    )
    div = Division("domain", tuple(f"d{i}" for i in range(n_domains)))
    cfg = ModelConfig(
        spec, (div,), backbone=backbone, method=method, embed_dim=8, tower=(256, 128, 64),
        experts_per_domain=experts,
    )  # fmt: skip
    model = MultiDomainModel(cfg)
    with torch.no_grad():  # trained-looking adapters (B starts at zero)
        for name, p in model.named_parameters():
            if name.startswith(("tower.banks", "gate")):
                p.normal_(0, 0.05)
    return model.eval()


def make_batch(n_domains: int, seed: int = 0) -> EncodedBatch:
    g = torch.Generator().manual_seed(seed)
    # a skewed mix: domain popularity ~ 1/rank (Zipf-like), as real traffic is
    weights = 1.0 / torch.arange(1, n_domains + 1, dtype=torch.float)
    domain = torch.multinomial(weights, BATCH, replacement=True, generator=g)
    sparse = torch.stack(
        [torch.randint(1, 6041, (BATCH,), generator=g),
         torch.randint(1, 3707, (BATCH,), generator=g), domain + 1], 1,
    )  # fmt: skip
    return EncodedBatch(sparse, torch.zeros(BATCH, 0), domain.unsqueeze(1))


def per_domain_loop(model: MultiDomainModel, batch: EncodedBatch) -> Callable[[], torch.Tensor]:
    domain = batch.domains[:, 0]
    order = torch.argsort(domain)
    counts = torch.bincount(domain).tolist()
    parts = [batch.select(idx) for idx in torch.split(order, counts) if idx.numel()]

    def run() -> torch.Tensor:
        out = torch.empty(BATCH)
        scores = torch.cat([model.score_batch(p) for p in parts])
        out[order] = scores
        return out

    return run


def scorer(model: MultiDomainModel, batch: EncodedBatch) -> Callable[[], torch.Tensor]:
    return lambda: model.score_batch(batch)


def timeit(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call; the candidates are interleaved so drift hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(5):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 15 if args.quick else 60
    results: dict[str, float] = {}
    print(f"{'backbone':8} {'domains':>7} {'mode':10} {'strategy':24} {'ms':>7} "
          f"{'x backbone':>10} {'loop/one':>8}")  # fmt: skip
    for backbone in ("deepfm", "mlp"):
        for n in (21, 200):
            batch = make_batch(n)
            base = make_model(backbone, "base", n)
            modes = {
                "mlora": make_model(backbone, "mlora", n),
                "moe": make_model(backbone, "moe", n, 1),
                "moe3": make_model(backbone, "moe", n, 3),
            }
            for mode, model in modes.items():
                fns: dict[str, Callable[[], object]] = {"backbone": scorer(base, batch)}
                for strategy in ("bag", "fused_down", "kernel"):
                    clone = make_model(backbone, "moe" if mode != "mlora" else "mlora", n,
                                       3 if mode == "moe3" else 1)  # fmt: skip
                    clone.load_state_dict(model.state_dict())
                    clone.set_routing(strategy)
                    fns[strategy] = scorer(clone, batch)
                tuned = model.tune_routing(batch, repeats=5)
                fns["tuned"] = scorer(model, batch)
                fns["loop"] = per_domain_loop(model, batch)
                with torch.inference_mode():
                    t = timeit(fns, rounds)
                for name in ("bag", "fused_down", "kernel", "tuned"):
                    label = f"{name}{'=' + ','.join(tuned) if name == 'tuned' else ''}"
                    ratio, speedup = t[name] / t["backbone"], t["loop"] / t[name]
                    print(f"{backbone:8} {n:7d} {mode:10} {label:24} {t[name] * 1e3:7.2f} "
                          f"{ratio:10.2f} {speedup:8.1f}")  # fmt: skip
                key = f"{mode}_over_backbone_{n}"
                loopkey = f"loop_over_onepass_{n}"
                if backbone == "deepfm":
                    results[key] = round(t["tuned"] / t["backbone"], 3)
                    if mode == "mlora":
                        results[loopkey] = round(t["loop"] / t["tuned"], 2)
                    results[f"{key}_bag"] = round(t["bag"] / t["backbone"], 3)
                else:
                    results[f"mlp_{key}"] = round(t["tuned"] / t["backbone"], 3)
                results[f"{backbone}_{mode}_{n}_backbone_ms"] = round(t["backbone"] * 1e3, 3)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
