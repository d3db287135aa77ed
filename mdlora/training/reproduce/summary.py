"""The report's summary, setup and discussion sections, computed from the cache (their words
are in ``report_template.md``)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mdlora.training.prose import template
from mdlora.training.reproduce.grid import (
    BACKBONE_LABELS,
    HOLDOUT_DOMAIN,
    HOLDOUT_NAME,
    LABELS,
    MULTILORA_METHODS_MLP,
    MULTILORA_PAPER_NAMES,
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

#: the report's prose (``mdlora/training/reproduce/report_template.md``)
PROSE = template("mdlora.training.reproduce", "report_template.md")


def amazon_section(amazon_results: Path) -> list[str]:
    """The real-data cells of ``mdlora reproduce-amazon`` (``mdlora.training.amazon``), if any
    ran."""
    if not any(amazon_results.glob("*.json")):
        return []
    from mdlora.training.amazon import report as amazon_report

    return [amazon_report(amazon_results), ""]


def summary_section(records: list[dict[str, Any]], sl: Slice) -> list[str]:
    """Headline findings and time spent, computed from the cache (nothing typed by hand)."""
    findings: list[str] = []  # one bullet each
    stats = table1_stats(records, sl)
    for split in TABLE1_SPLITS:
        bbs = [b for b in TABLE1_BACKBONES
               if all((split, b, m) in stats for m in TABLE1_METHODS)]  # fmt: skip
        if not bbs:
            started = sorted({b for (sp, b, _) in stats if sp == split})
            if started:
                names = ", ".join(BACKBONE_LABELS[b] for b in started)
                findings.append(PROSE.text("summary_table1_started", split=split, backbones=names))
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
            PROSE.text("summary_table1_noise", noisy=len(noisy))
            if any(n > 1 for n in seeds)
            else PROSE.text("summary_table1_one_seed")
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
            sig_txt += PROSE.text(
                "summary_table1_unchanged", mlora=unchanged["mlora"], mlora_runs=n_runs["mlora"],
                moe=unchanged["moe"], moe_runs=n_runs["moe"],
            )  # fmt: skip
        findings.append(PROSE.text(
            "summary_table1", split=split, backbones=len(bbs), seeds="/".join(map(str, seeds)),
            base=f"{avg['base']:.2f}", mlora=f"{avg['mlora']:.2f}", moe=f"{avg['moe']:.2f}",
            paper_base=f"{paper['base']:.2f}", paper_mlora=f"{paper['mlora']:.2f}",
            paper_moe=f"{paper['moe']:.2f}", mlora_wins=wins, moe_wins=moe_wins, noise=sig_txt,
        ))  # fmt: skip
    ml = _select(records, sl, table="multilora", backbone="mlp")
    if ml:
        parts = []
        for m in MULTILORA_METHODS_MLP:
            vals = [r["test"]["age_group"]["auc"] for r in ml if r["method"] == m]
            if vals:
                p = PAPER_MULTILORA.get(("mlp", m))
                name = MULTILORA_PAPER_NAMES.get(m, LABELS[m])
                parts.append(f"{name} {statistics.fmean(vals):.4f}"
                             + ("" if p is None else f" (paper {p:.4f})"))  # fmt: skip
        findings.append(PROSE.text("summary_multilora", results=", ".join(parts)))
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
        mean_full = f"{100 * statistics.fmean(full):.2f}" if full else ""
        retrained = PROSE.text("summary_add_domain_full", full=mean_full) if full else ""
        findings.append(PROSE.text(
            "summary_add_domain", domain=HOLDOUT_DOMAIN, name=HOLDOUT_NAME,
            alone=f"{100 * alone:.2f}", added=f"{100 * added:.2f}", full=retrained,
        ))  # fmt: skip
    if not findings:
        findings.append(PROSE.text("summary_nothing"))
    parts_rows = []
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
        parts_rows.append(f"| {table} | {len(expected) - len(missing)} of {len(expected)} | "
                          f"{_hms(spent)} | {len(missing)} | {left_txt} |")  # fmt: skip
    out = PROSE.lines(
        "summary", findings="\n".join(findings), parts="\n".join(parts_rows),
        spent=_hms(total_spent), left=_hms(total_left),
    )  # fmt: skip
    out.append("")
    devices = sorted({r.get("device", "?") for r in _select(records, sl)})
    if devices:
        out += [PROSE.text("devices", devices="; ".join(devices)), ""]
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
    return PROSE.text("setup_code", old=old, cells=len(stamps), since=FAST_DROPOUT_SINCE)


def _setup_section(records: list[dict[str, Any]] | None = None) -> list[str]:
    code = _code_line(records or [])
    return [*PROSE.lines("setup"), *([code] if code else []), ""]


def _discussion(records: list[dict[str, Any]], sl: Slice, results_dir: Path) -> list[str]:
    """Why the numbers differ; every figure quoted here is computed from the cache."""
    stats = table1_stats(records, sl)
    stds = [100 * s.std for s in stats.values() if s.std is not None]
    # MLoRA's distance from Base in each (split, backbone) where both ran
    both = [(sp, b) for (sp, b) in dict.fromkeys(k[:2] for k in stats)
            if (sp, b, "base") in stats and (sp, b, "mlora") in stats]  # fmt: skip
    gaps = [abs(100 * ((stats[(sp, b, "mlora")].mean or 0) - (stats[(sp, b, "base")].mean or 0)))
            for (sp, b) in both]  # fmt: skip
    if stds:
        gap = (PROSE.text("discussion_seeds_gap", gap=f"{statistics.fmean(gaps):.2f}")
               if gaps else "")  # fmt: skip
        seeds = PROSE.text("discussion_seeds", mean=f"{statistics.fmean(stds):.2f}",
                           max=f"{max(stds):.2f}", gap=gap)  # fmt: skip
    else:
        seeds = PROSE.text("discussion_one_seed")
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
            PROSE.text(
                "discussion_stopping",
                kind=k,
                best=f"{statistics.fmean(v):.1f}",
                epochs=f"{statistics.fmean(runs[k]):.1f}",
                never=sum(1 for x in v if x == 0),
                phases=len(v),
            )
            for k, v in sorted(best.items())
        )
    else:
        stop = PROSE.text("discussion_no_phase")
    probe = "\n".join(_probe_lines(results_dir))
    return [*PROSE.lines("discussion", seeds=seeds, stopping=stop, probe=probe), ""]


def _probe_lines(results_dir: Path) -> list[str]:
    """The adapter-phase probe (``scripts/probe_adapter_phase.py``), when it has run."""
    files = sorted((results_dir / "probe").glob("*.json"))
    if not files:
        return PROSE.lines("probe_not_run")
    rows = []
    for f in files:
        rec = json.loads(f.read_text())
        backbone = BACKBONE_LABELS.get(rec["backbone"], rec["backbone"])
        tag = f"{rec['split']} / {backbone} / seed {rec['seed']}"
        for name, points in rec["runs"].items():
            first, last = points[0], points[-1]
            trail = ", ".join(f"{100 * p['val_auc']:.2f}" for p in points)
            rows.append(
                f"  | {tag} | {name} | 0 → epoch {last['epoch']} | "
                f"{100 * first['train_auc']:.2f} → {100 * last['train_auc']:.2f} | "
                f"{100 * first['val_auc']:.2f} → {100 * last['val_auc']:.2f} ({trail}) |"
            )
    return [*PROSE.lines("probe", rows="\n".join(rows)), ""]
