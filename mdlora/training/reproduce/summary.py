"""The report's summary, setup and discussion sections, computed from the cache."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


from mdlora.training.reproduce.grid import (
    BACKBONE_LABELS,
    HOLDOUT_DOMAIN,
    HOLDOUT_NAME,
    LABELS,
    MULTILORA_METHODS_MLP,
    PAPER_MULTILORA,
    PAPER_TABLE1_AVG,
    REPO_ROOT,
    TABLE1_BACKBONES,
    TABLE1_METHODS,
    TABLE1_SPLITS,
    TABLES,
    Slice,
    build_grid,
)
from mdlora.training.reproduce.schedule import _hms, estimate_seconds
from mdlora.training.reproduce.stats import _select, significant, table1_stats


def amazon_section(amazon_results: Path) -> list[str]:
    """The real-data cells of ``mdlora reproduce-amazon`` (``mdlora.training.amazon``), if any
    ran."""
    if not any(amazon_results.glob("*.json")):
        return []
    from mdlora.training.amazon import report as amazon_report

    return [amazon_report(amazon_results), ""]


def summary_section(records: list[dict[str, Any]], sl: Slice) -> list[str]:
    """Headline findings and time spent, computed from the cache (nothing typed by hand)."""
    out = ["## Summary", ""]
    stats = table1_stats(records, sl)
    for split in TABLE1_SPLITS:
        bbs = [b for b in TABLE1_BACKBONES
               if all((split, b, m) in stats for m in TABLE1_METHODS)]  # fmt: skip
        if not bbs:
            started = sorted({b for (sp, b, _) in stats if sp == split})
            if started:
                out.append(f"* **Table 1, ML-{split}**: no backbone has all three methods yet "
                           f"(cells finished for {', '.join(BACKBONE_LABELS[b] for b in started)}"
                           "; see the table).")  # fmt: skip
            continue
        avg = {m: statistics.fmean(100 * (stats[(split, b, m)].mean or 0) for b in bbs)
               for m in TABLE1_METHODS}  # fmt: skip
        paper = PAPER_TABLE1_AVG[split]
        wins = sum((stats[(split, b, "mlora")].mean or 0) > (stats[(split, b, "base")].mean or 0)
                   for b in bbs)  # fmt: skip
        moe_wins = sum((stats[(split, b, "moe")].mean or 0) > (stats[(split, b, "base")].mean or 0)
                       for b in bbs)  # fmt: skip
        seeds = sorted({len(stats[(split, b, "base")].values) for b in bbs})
        noisy = [
            b
            for b in bbs
            if significant(stats[(split, b, "mlora")], stats[(split, b, "base")]) is False
        ]
        sig_txt = (
            f"; MLoRA − Base is within seed noise for {len(noisy)} of them"
            if any(n > 1 for n in seeds)
            else "; one seed so far, so no noise estimate"
        )
        unchanged = {
            m: sum(
                1 for r in _select(records, sl, table="table1", split=split, method=m)
                if r["backbone"] in bbs and _adapters_never_improved(r)
            )
            for m in ("mlora", "moe")
        }  # fmt: skip
        n_runs = {m: len(_select(records, sl, table="table1", split=split, method=m))
                  for m in ("mlora", "moe")}  # fmt: skip
        if unchanged["mlora"] or unchanged["moe"]:
            sig_txt += (
                f". {unchanged['mlora']} of {n_runs['mlora']} MLoRA and {unchanged['moe']} of "
                f"{n_runs['moe']} MoE-MLoRA runs end exactly at the Base model: none of their "
                "adapter phases beat the backbone's validation AUC in any epoch, so early "
                "stopping restored the starting point"
            )
        out.append(
            f"* **Table 1, ML-{split}** ({len(bbs)} of 8 backbones, {'/'.join(map(str, seeds))} "
            f"seed(s)): average WAUC Base {avg['base']:.2f} / MLoRA {avg['mlora']:.2f} / "
            f"MoE-MLoRA {avg['moe']:.2f}, paper {paper['base']:.2f} / {paper['mlora']:.2f} / "
            f"{paper['moe']:.2f} (the paper's average is over all eight). MLoRA beats Base on "
            f"{wins} of {len(bbs)} backbones, MoE-MLoRA on {moe_wins}{sig_txt}."
        )
    ml = _select(records, sl, table="multilora", backbone="mlp")
    if ml:
        parts = []
        for m in MULTILORA_METHODS_MLP:
            vals = [r["test"]["age_group"]["auc"] for r in ml if r["method"] == m]
            if vals:
                p = PAPER_MULTILORA.get(("mlp", m))
                parts.append(f"{'Mix' if m == 'base' else LABELS[m]} {statistics.fmean(vals):.4f}"
                             + ("" if p is None else f" (paper {p:.4f})"))  # fmt: skip
        out.append("* **MultiLoRA setting, MLP**, total test AUC: " + ", ".join(parts) + ".")
    adds = _select(records, sl, table="add_domain")
    if adds:
        alone = statistics.fmean(r["test_new_domain"]["backbone"]["auc"] for r in adds)
        added = statistics.fmean(r["test_new_domain"]["added"]["auc"] for r in adds)
        runs = {(a["backbone"], a["seed"]) for a in adds}
        full = [
            _domain_auc(r, "occupation", HOLDOUT_DOMAIN)
            for r in _select(records, sl, table="table1", split="occupation", method="mlora")
            if (r["backbone"], r["seed"]) in runs
        ]
        txt = (f"* **Adding occupation {HOLDOUT_DOMAIN} ({HOLDOUT_NAME}) afterwards**: its test "
               f"AUC goes from {100 * alone:.2f} (its grown rows, no adapter) to "
               f"{100 * added:.2f} with the added adapter and its rows")  # fmt: skip
        if full:
            txt += f"; a full MLoRA retraining that saw it gets {100 * statistics.fmean(full):.2f}"
        out.append(txt + ".")
    if len(out) == 2:
        out.append("* No cell has finished yet.")
    out.append("")
    out += ["Time spent on this machine, from the cached cell durations:", "",
            "| part | cells done | time spent | cells not run | estimated time for them |",
            "|---|---:|---:|---:|---:|"]  # fmt: skip
    total_spent = total_left = 0.0
    for table in TABLES:
        expected = [c for c in build_grid([table], data_slice=sl) if c.table == table]
        recs = [r for r in _select(records, sl, table=table) if not r.get("same_run_as")]
        done_ids = {r["cell"] for r in _select(records, sl, table=table)}
        missing = [c for c in expected if c.cell_id not in done_ids]
        spent = sum(r["seconds"] for r in recs)
        left = sum(estimate_seconds(c, records) for c in missing)
        total_spent, total_left = total_spent + spent, total_left + left
        left_txt = _hms(left) if missing else "—"
        out.append(f"| {table} | {len(expected) - len(missing)} of {len(expected)} | "
                   f"{_hms(spent)} | {len(missing)} | {left_txt} |")  # fmt: skip
    out += [f"| **all** | | {_hms(total_spent)} | | {_hms(total_left)} |", ""]
    devices = sorted({r.get("device", "?") for r in _select(records, sl)})
    if devices:
        out += ["Devices: " + "; ".join(devices) + ".", ""]
    return out


def _adapters_never_improved(rec: dict[str, Any]) -> bool:
    """Whether every phase a cell trained itself kept its starting point (best epoch 0)."""
    own = [p for p in rec.get("phases", []) if p["name"] not in rec.get("shared_phases", [])]
    return bool(own) and all(int(p["best_epoch"]) == 0 for p in own)


def _domain_auc(rec: dict[str, Any], division: str, domain: str) -> float:
    return float(next(d["auc"] for d in rec["test"][division]["domains"] if d["domain"] == domain))


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


#: when the 16-bit CPU dropout mask and fused Adam landed (commit 55d6374)
FAST_DROPOUT_SINCE = "2026-11-24T10:58:00Z"


def _code_line(records: list[dict[str, Any]]) -> str:
    """Which training code the cached cells ran with (same distributions, other streams)."""
    stamps = [str(r.get("finished_at", "")) for r in records if not r.get("same_run_as")]
    old = sum(1 for t in stamps if t and t < FAST_DROPOUT_SINCE)
    if not old:
        return ""
    return (
        f"* Code: {old} of the {len(stamps)} cells finished before {FAST_DROPOUT_SINCE} ran "
        "with torch's per-element Bernoulli dropout and multi-tensor Adam; the rest with the "
        "16-bit CPU dropout mask (`mdlora.models.layers.Dropout`) and fused Adam, which draw the "
        "same "
        "distributions from other random streams and run an epoch several times faster. A "
        "seed therefore does not reproduce an older cell bit for bit; it is one more sample "
        "of the same experiment."
    )


def _setup_section(records: list[dict[str, Any]] | None = None) -> list[str]:
    code = _code_line(records or [])
    return [
        "## Setup",
        "",
        "* Data: MovieLens-1M from `../shared/data/ml-1m` (`ratings_no_timestamp.dat`). "
        "MLoRA setting (Table 1, Figure 2, add-domain): user id, movie id and the domain as "
        "sparse fields, label rating = 5, per-domain 60/20/20 split stratified on the label, "
        "data seed 2024 for every model seed. MultiLoRA setting: the `ml1m-multilora` preset "
        "(HAMUR's fields, label rating > 3, random 8:1:1 split).",
        "* Training: `mdlora.training.run.run_training` with the settings' published "
        "hyper-parameters (embedding 8, tower 256-128-64, dropout 0.5, Adam 1e-3, batch 1024, "
        "L2 1e-5 on embeddings/linear/cross for MLoRA; embedding 16, tower 256-128, LoRA rank "
        "8, fusion rank 8 for MultiLoRA, with the project defaults the paper leaves open: "
        "dropout 0.2, Adam 1e-3, batch 1024), up to 10 epochs per phase, early stopping on "
        "the mean per-domain validation AUC with patience 3 and the best epoch restored.",
        "* Seeds 1, 2, 3 per cell (model initialisation and batch order; the data split is "
        'fixed). Mean ± sample standard deviation; "within seed noise" means the difference '
        "of means is smaller than the larger of the two standard deviations (a rough screen, "
        "three seeds are too few for a formal test).",
        "* Phase 1 (the backbone) is trained once per (setting, backbone, seed) and shared by "
        "every method of that group, as are MultiLoRA's LoRA phases by SingleLoRA and the "
        "-add / -avg ablations; a shared phase is the identical computation "
        "(tests/training/test_reproduce.py checks the weights match an unshared run).",
        "* Timings are wall-clock seconds per cell on a machine shared with other work, so "
        "they are noisy. Several `mdlora reproduce` processes can work through one grid side "
        "by side (`--workers N` starts them; a lock per group keeps them apart); the thread "
        "count per process is in the device line above. On the shared 2-core machine, one "
        "thread per process was used: "
        "with two threads, a training step ran about 15 times slower under contention "
        "(measured before `mdlora` shortened OpenMP's spin-wait, `GOMP_SPINCOUNT=10000`).",
        *([code] if code else []),
        "",
    ]


def _discussion(records: list[dict[str, Any]], sl: Slice, results_dir: Path) -> list[str]:
    """Why the numbers differ; every figure quoted here is computed from the cache."""
    stats = table1_stats(records, sl)
    stds = [100 * s.std for s in stats.values() if s.std is not None]
    gaps = [abs(100 * ((stats[(sp, b, "mlora")].mean or 0) - (stats[(sp, b, "base")].mean or 0)))
            for (sp, b, m) in stats if m == "base" and (sp, b, "mlora") in stats]  # fmt: skip
    if stds:
        seeds = (
            "Over the cells with two or more seeds, the seed standard deviation of WAUC is "
            f"{statistics.fmean(stds):.2f} points on average (max {max(stds):.2f})"
        )
        if gaps:
            seeds += (f", against a mean |MLoRA − Base| of {statistics.fmean(gaps):.2f} points "
                      "over the cells run")  # fmt: skip
        seeds += "."
    else:
        seeds = ("No cell has a second seed yet, so the seed noise of our numbers is not "
                 "measured; ALGORITHMS.md §7 puts it at 0.1-0.3 WAUC points.")  # fmt: skip
    best: dict[str, list[int]] = defaultdict(list)
    runs: dict[str, list[int]] = defaultdict(list)
    for r in _select(records, sl):
        if r.get("same_run_as"):
            continue
        for ph in r.get("phases", []):
            if ph["name"] in r.get("shared_phases", []):
                continue
            kind = ph["name"].split(":")[0]
            best[kind].append(int(ph["best_epoch"]))
            runs[kind].append(int(ph["epochs_run"]))
    if best:
        stop = "; ".join(
            f"{k}: best epoch {statistics.fmean(v):.1f} of {statistics.fmean(runs[k]):.1f} run "
            f"({sum(1 for x in v if x == 0)} of {len(v)} never beat their starting point)"
            for k, v in sorted(best.items())
        )
    else:
        stop = "no phase has run yet"
    return [
        "## Why our numbers differ from the papers'",
        "",
        f"* **Seeds.** The papers report one run per cell. {seeds} Differences between methods "
        "smaller than the seed noise are flagged in the tables and should not be read as a "
        "ranking.",
        "* **Preprocessing.** Our MLoRA-setting split is per domain, stratified on the label, "
        "with data seed 2024; the public code's exact shuffling and its age-id bug "
        "(ALGORITHMS.md §1) are not copied, so absolute WAUCs can move by a few tenths. The "
        "MultiLoRA setting follows HAMUR's fields; its dropout, optimiser and batch size are "
        "not given by the paper and are project defaults.",
        "* **Public code behaviour.** MoE-MLoRA's public code did not actually freeze its "
        "phases and never trained the gate's domain embedding (ALGORITHMS.md §4); we follow "
        "the paper with real freezing, which can move MoE-MLoRA's numbers relative to the "
        "published ones. MLoRA's stage 2 trains A, B and c (the public variant with "
        "zero-initialised A, where only c learns, is not copied).",
        f"* **Early stopping** (mean per-domain validation AUC, patience 3, best epoch "
        f"restored), per phase kind over the phases trained so far: {stop}. A phase that never "
        "beats its starting point leaves the model exactly as it was (for MLoRA: the Base "
        "backbone), which is why some MLoRA and Base numbers coincide.",
        *_probe_lines(results_dir),
        "* **Adding a domain.** The held-out occupation's users occur in no other occupation, "
        "so their ids are unknown to the model that never saw the domain and only the adapter "
        "can learn; the full retraining learned their embeddings. The gap between the two is "
        "the price of not retraining; the other domains' scores stay bit-identical.",
        "",
    ]


def _probe_lines(results_dir: Path) -> list[str]:
    """The adapter-phase probe (``scripts/probe_adapter_phase.py``), when it has run."""
    files = sorted((results_dir / "probe").glob("*.json"))
    if not files:
        return [
            "* **Why the adapter phases stop at epoch 0.** Not probed yet: "
            "`.venv/bin/python scripts/probe_adapter_phase.py` measures training vs validation "
            "AUC while the adapters train past the early-stopping point."
        ]
    out = [
        "* **Why the adapter phases stop at epoch 0.** `scripts/probe_adapter_phase.py` "
        "trains phase 1 as above, then keeps training from it without early stopping and "
        "measures the mean per-domain AUC on 200k training rows and on the validation split "
        "(eval mode) along the way. Training AUC rises while validation AUC falls from the "
        "first hundred steps, for the adapters (backbone frozen) as for the backbone itself: "
        "the backbone stopped where its user and movie id embeddings had begun to memorise "
        "the training rows, and a second phase on the same rows fits that memorised signal, "
        "which does not carry over to validation. With only ids and the domain as features, "
        "the domain's effect is already in the backbone (the domain is an embedded field), "
        "so there is little left for a per-domain adapter to add. The synthetic data, whose "
        "domains differ by construction, shows the adapters working (the quick start and "
        "tests/training). Measured:",
        "",
        "  | probe | continuation | steps | train AUC | val AUC |",
        "  |---|---|---|---|---|",
    ]
    for f in files:
        rec = json.loads(f.read_text())
        backbone = BACKBONE_LABELS.get(rec["backbone"], rec["backbone"])
        tag = f"{rec['split']} / {backbone} / seed {rec['seed']}"
        for name, points in rec["runs"].items():
            first, last = points[0], points[-1]
            trail = ", ".join(f"{100 * p['val_auc']:.2f}" for p in points)
            out.append(
                f"  | {tag} | {name} | 0 → epoch {last['epoch']} | "
                f"{100 * first['train_auc']:.2f} → {100 * last['train_auc']:.2f} | "
                f"{100 * first['val_auc']:.2f} → {100 * last['val_auc']:.2f} ({trail}) |"
            )
    out.append("")
    return out
