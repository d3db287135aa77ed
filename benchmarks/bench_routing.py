"""Routing benchmark: one mixed-domain batch through adapters vs the bare backbone.

Inference on a batch of 1024 samples spread (skewed) over 21 and 200 domains, for DeepFM and
MLP in the MLoRA MovieLens setting (user id, movie id, domain id; embedding 8; tower
256-128-64; ranks from the published alpha). Modes: MLoRA, MoE-MLoRA with one and with three
experts per domain. Each is timed side by side, interleaved, against

* the same backbone with no adapters (``*_over_backbone``: the model's default routing;
  ``*_tuned``: the per-layer choice of ``tune_routing``; ``*_bag``: embedding_bag only),
* scoring each domain's samples with a separate call of the same model
  (``loop_over_onepass``: per-domain calls / one pass; those calls get the merged
  single-domain layers, the strongest baseline), and with separate calls that apply the
  adapter per sample as the papers' code does (``loop_unmerged_over_onepass``), and
* the same 1024 rows all in one domain, the shape of one ``/predict`` request, against the
  backbone on those rows (``*_single_domain_over_backbone_*``).

Strategies timed: ``bag``, ``fused_down``, ``kernel``, ``merged``, the default and the tuned
choice. Prints a table, then one JSON line. Run:
``.venv/bin/python benchmarks/bench_routing.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from mdlora.models.features import EncodedBatch, FeatureSpec, SparseField
from mdlora.models.model import Division, ModelConfig, MultiDomainModel
from mdlora.training.data.presets import MOVIELENS_ALPHA

BATCH = 1024
STRATEGIES = ("bag", "fused_down", "kernel", "merged")
#: the models timed: mode -> (method, experts per domain)
MODES = {"mlora": ("mlora", 1), "moe": ("moe", 1), "moe3": ("moe", 3)}
#: the mode whose one-pass scoring is compared with a loop over domains (JSON loop_* keys)
LOOP_MODE = "mlora"


def make_model(backbone: str, method: str, n_domains: int, experts: int = 1) -> MultiDomainModel:
    spec = FeatureSpec(
        sparse=(SparseField("user", 6041), SparseField("movie", 3707), SparseField("domain", 201))
    )
    div = Division("domain", tuple(f"d{i}" for i in range(n_domains)))
    cfg = ModelConfig(
        spec, (div,), backbone=backbone, method=method, embed_dim=8, tower=(256, 128, 64),
        experts_per_domain=experts, alpha=MOVIELENS_ALPHA[backbone],  # MovieLens-shaped
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


def per_domain_loop(
    model: MultiDomainModel, batch: EncodedBatch, merged: bool = True
) -> Callable[[], torch.Tensor]:
    """One model call per domain. ``merged=False``: each call applies the per-sample adapter
    (``x A B``, as the papers' code does) rather than the domain's merged layer."""
    domain = batch.domains[:, 0]
    order = torch.argsort(domain)
    counts = torch.bincount(domain).tolist()
    parts = [batch.select(idx) for idx in torch.split(order, counts) if idx.numel()]

    def run() -> torch.Tensor:
        out = torch.empty(BATCH)
        if not merged:
            for bank in model.inference_banks():
                bank.merge_limit = 0
        scores = torch.cat([model.score_batch(p, check=False) for p in parts])
        out[order] = scores
        return out

    return run


def single_domain(batch: EncodedBatch) -> EncodedBatch:
    """The same rows, all in the batch's most popular domain (one /predict request's shape)."""
    one = batch.select(torch.arange(len(batch)))
    top = int(torch.bincount(one.domains[:, 0]).argmax())
    one.domains = torch.full_like(one.domains, top)
    one.sparse = one.sparse.clone()
    one.sparse[:, 2] = top + 1
    return one


def scorer(model: MultiDomainModel, batch: EncodedBatch) -> Callable[[], torch.Tensor]:
    return lambda: model.score_batch(batch, check=False)


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
    print(f"{'backbone':8} {'domains':>7} {'mode':10} {'strategy':30} {'ms':>7} "
          f"{'x backbone':>10} {'loop/one':>8}")  # fmt: skip
    for backbone in ("deepfm", "mlp"):
        for n in (21, 200):
            batch = make_batch(n)
            base = make_model(backbone, "base", n)
            modes = {mode: make_model(backbone, method, n, experts)
                     for mode, (method, experts) in MODES.items()}  # fmt: skip
            one = single_domain(batch)
            for mode, model in modes.items():
                method, experts = MODES[mode]
                fns: dict[str, Callable[[], object]] = {
                    "backbone": scorer(base, batch), "backbone_single": scorer(base, one),
                }  # fmt: skip
                default = model.default_routing()
                for strategy in (*STRATEGIES, "default"):
                    clone = make_model(backbone, method, n, experts)
                    clone.load_state_dict(model.state_dict())
                    clone.set_routing(default if strategy == "default" else strategy)
                    fns[strategy] = scorer(clone, batch)
                    if strategy == "default":
                        fns["single"] = scorer(clone, one)
                        fns["loop"] = per_domain_loop(clone, batch)
                    if strategy == "kernel":
                        fns["loop_unmerged"] = per_domain_loop(clone, batch, merged=False)
                tuned = model.tune_routing(batch, repeats=5)
                fns["tuned"] = scorer(model, batch)
                with torch.inference_mode():
                    t = timeit(fns, rounds)
                for name in (*STRATEGIES, "default", "tuned"):
                    label = name
                    if name in ("default", "tuned"):
                        label += "=" + ",".join(default if name == "default" else tuned)
                    ratio, speedup = t[name] / t["backbone"], t["loop"] / t[name]
                    print(f"{backbone:8} {n:7d} {mode:10} {label:30} {t[name] * 1e3:7.2f} "
                          f"{ratio:10.2f} {speedup:8.1f}")  # fmt: skip
                single = t["single"] / t["backbone_single"]
                print(f"{backbone:8} {n:7d} {mode:10} {'one domain, default':30} "
                      f"{t['single'] * 1e3:7.2f} {single:10.2f}")  # fmt: skip
                key = f"{mode}_over_backbone_{n}"
                prefix = "" if backbone == "deepfm" else "mlp_"
                results[f"{prefix}{key}"] = round(t["default"] / t["backbone"], 3)
                results[f"{prefix}{key}_tuned"] = round(t["tuned"] / t["backbone"], 3)
                results[f"{prefix}{mode}_single_domain_over_backbone_{n}"] = round(single, 3)
                if backbone == "deepfm":
                    if mode == LOOP_MODE:
                        results[f"loop_over_onepass_{n}"] = round(t["loop"] / t["default"], 2)
                        results[f"loop_unmerged_over_onepass_{n}"] = round(
                            t["loop_unmerged"] / t["default"], 2
                        )
                    results[f"{key}_bag"] = round(t["bag"] / t["backbone"], 3)
                results[f"{backbone}_{mode}_{n}_backbone_ms"] = round(t["backbone"] * 1e3, 3)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
