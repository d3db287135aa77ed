"""The Markdown report's tables (``docs/results.md``), rebuilt from the cache alone.

The words are in ``report_template.md`` beside this module (:data:`PROSE`); the code here
computes the numbers, table rows and commands that fill it.
"""

from __future__ import annotations

import os
import shlex
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from mdlora.training.prose import template
from mdlora.training.reproduce.cache import load_cache
from mdlora.training.reproduce.grid import (
    ADD_DOMAIN_BACKBONES,
    BACKBONE_LABELS,
    DEFAULT_DOCS,
    DEFAULT_RESULTS,
    DEFAULT_WORK,
    FIGURE2_BACKBONES,
    FIGURE2_EXPERTS,
    HOLDOUT_DOMAIN,
    HOLDOUT_NAME,
    LABELS,
    MULTILORA_BACKBONES,
    MULTILORA_METHODS_MLP,
    MULTILORA_METHODS_OTHER,
    MULTILORA_PAPER_NAMES,
    PAPER_MULTILORA,
    PAPER_TABLE1_AVG,
    PAPER_TABLE1_CELLS,
    TABLE1_BACKBONES,
    TABLE1_METHODS,
    TABLE1_SPLITS,
    TABLE7_METHOD,
    Cell,
    Settings,
    Slice,
    build_grid,
    default_data_dir,
)
from mdlora.training.reproduce.plots import plot_figure2, plot_multilora, plot_table1
from mdlora.training.reproduce.schedule import _hms, estimate_seconds
from mdlora.training.reproduce.stats import Stat, _select, significant, table1_stats
from mdlora.training.reproduce.summary import (
    _discussion,
    _rel,
    _setup_section,
    amazon_section,
    summary_section,
)

#: the report's prose (``mdlora/training/reproduce/report_template.md``)
PROSE = template("mdlora.training.reproduce", "report_template.md")


# ------------------------------------------------------------------------------ report
def _pp(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _status(expected: list[Cell], results_dir: Path) -> tuple[list[Cell], list[Cell]]:
    have = [c for c in expected if c.path(results_dir).is_file()]
    missing = [c for c in expected if not c.path(results_dir).is_file()]
    return have, missing


def _commands(missing: list[Cell]) -> list[str]:
    """Compact commands that run the missing cells: one per (table, split, seed)."""
    grouped: dict[tuple[str, str, int, Slice], set[str]] = defaultdict(set)
    for c in missing:
        grouped[(c.table, c.split, c.seed, c.slice)].add(c.backbone)
    every = {
        "table1": set(TABLE1_BACKBONES), "figure2": set(FIGURE2_BACKBONES),
        "multilora": set(MULTILORA_BACKBONES), "add_domain": set(ADD_DOMAIN_BACKBONES),
    }  # fmt: skip
    out = []
    for (table, split, seed, sl), bbs in grouped.items():
        parts = ["mdlora reproduce", f"--table {table}"]
        if table != "multilora":
            parts.append(f"--split {split}")
        if bbs != every[table]:
            parts.append("--backbone " + ",".join(sorted(bbs)))
        parts += [f"--seed {seed}", *sl.options()]
        out.append(" ".join(parts))
    return out


def _time_lines(
    records: list[dict[str, Any]], sl: Slice, table: str, missing: list[Cell]
) -> list[str]:
    """The time a table's cells of slice ``sl`` took, and an estimate for its missing ones."""
    recs = [r for r in _select(records, sl, table=table) if not r.get("same_run_as")]
    spent = sum(r["seconds"] for r in recs)
    devices = sorted({r.get("device", "?").split(" (")[0] for r in recs})
    left = sum(estimate_seconds(c, records) for c in missing)
    more = PROSE.text("time_left", cells=len(missing), left=_hms(left)) if missing else ""
    line = PROSE.text("time", cells=len(recs), spent=_hms(spent),
                      devices=", ".join(devices) or "—", left=more)  # fmt: skip
    return [line, ""]


def _not_run_block(missing: list[Cell]) -> list[str]:
    if not missing:
        return []
    return [*PROSE.lines("not_run", commands="\n".join(_commands(missing))), ""]


def report_table1(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    stats = table1_stats(records, sl)
    expected = build_grid(["table1"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    out = [*PROSE.lines("table1"), ""]
    for split in TABLE1_SPLITS:
        rows = []
        col_means: dict[str, list[float]] = defaultdict(list)
        for bb in TABLE1_BACKBONES:
            s = {m: stats.get((split, bb, m), Stat([])) for m in TABLE1_METHODS}
            if all(s[m].mean is not None for m in TABLE1_METHODS):  # complete rows only
                for m in TABLE1_METHODS:
                    col_means[m].append(100 * (s[m].mean or 0.0))
            d_ml = _diff(s["mlora"], s["base"])
            d_moe = _diff(s["moe"], s["base"])
            paper = PAPER_TABLE1_CELLS.get((split, bb))
            ptxt = "—" if paper is None else " / ".join(f"{paper[m]:.2f}" for m in TABLE1_METHODS)
            if paper is not None:
                ours = {m: s[m].mean for m in TABLE1_METHODS}
                diffs = [
                    _pp(None if (v := ours[m]) is None else 100 * v - paper[m])
                    for m in TABLE1_METHODS
                ]
                ptxt += f" (ours − paper: {' / '.join(diffs)})"
            note = _noise_note(s)
            rows.append(
                f"| {BACKBONE_LABELS[bb]} | {s['base'].fmt()} | {s['mlora'].fmt()} | "
                f"{s['moe'].fmt()} | {_pp(d_ml)} | {_pp(d_moe)} | {ptxt} | {note} |"
            )
        paper_avg = PAPER_TABLE1_AVG[split]
        full = all(len(col_means[m]) == len(TABLE1_BACKBONES) for m in TABLE1_METHODS)
        avg = {m: statistics.fmean(v) if v else None for m, v in col_means.items()}
        cells = [
            "—" if (v := avg.get(m)) is None else f"{v:.2f}" + ("" if full else "*")
            for m in TABLE1_METHODS
        ]
        pavg = " / ".join(f"{paper_avg[m]:.2f}" for m in TABLE1_METHODS)
        avg_diffs = " / ".join(
            _pp(None if (v := avg.get(m)) is None else v - paper_avg[m]) for m in TABLE1_METHODS
        )
        rows.append(
            f"| **average** | {cells[0]} | {cells[1]} | {cells[2]} | | | {pavg} "
            f"(ours − paper: {avg_diffs}) | |"
        )
        out += PROSE.lines("table1_split", split=split, rows="\n".join(rows))
        if not full:
            n_rows = len(col_means["base"])
            out += ["", PROSE.text("table1_partial_average", backbones=n_rows)]
        out.append("")
        plot = plot_table1(stats, split, docs_dir)
        if plot is not None:
            out += [PROSE.text("table1_plot", split=split, file=plot.name), ""]
    out += _time_lines(records, sl, "table1", missing)
    out += _not_run_block(missing)
    return out


def _diff(a: Stat, b: Stat) -> float | None:
    if a.mean is None or b.mean is None:
        return None
    return 100 * (a.mean - b.mean)


def _noise_note(s: dict[str, Stat]) -> str:
    notes = []
    for m in ("mlora", "moe"):
        sig = significant(s[m], s["base"])
        if sig is False:
            notes.append(f"{LABELS[m]} vs Base within seed noise")
    if s["mlora"].n and s["moe"].n and significant(s["mlora"], s["moe"]) is False:
        notes.append("MLoRA vs MoE within noise")
    if not notes and s["base"].n == 1:
        return "1 seed: noise unknown"
    return "; ".join(notes)


def report_figure2(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    expected = build_grid(["figure2"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    stats: dict[tuple[str, int], Stat] = defaultdict(lambda: Stat([]))
    for r in _select(records, sl, table="figure2"):
        if r.get("wauc") is not None:
            stats[(r["backbone"], int(r["experts_per_domain"]))].values.append(float(r["wauc"]))
    rows = []
    for bb in FIGURE2_BACKBONES:
        row = [stats.get((bb, k), Stat([])).fmt() for k in FIGURE2_EXPERTS]
        rows.append(f"| {BACKBONE_LABELS[bb]} | " + " | ".join(row) + " |")
    out = PROSE.lines(
        "figure2", columns=" | ".join(f"{2 * k} experts" for k in FIGURE2_EXPERTS),
        align="---:|" * len(FIGURE2_EXPERTS), rows="\n".join(rows),
    )  # fmt: skip
    out.append("")
    plot = plot_figure2(stats, docs_dir)
    if plot is not None:
        out += [PROSE.text("figure2_plot", file=plot.name), ""]
    out += _time_lines(records, sl, "figure2", missing)
    out += _not_run_block(missing)
    return out


def report_multilora(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    expected = build_grid(["multilora"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    recs = _select(records, sl, table="multilora")
    out = [*PROSE.lines("multilora"), ""]
    domains = ["1-18", "25", "35-56"]
    for bb in MULTILORA_BACKBONES:
        methods = MULTILORA_METHODS_MLP if bb == "mlp" else MULTILORA_METHODS_OTHER
        rows = []
        for m in methods:
            rs = [r for r in recs if r["backbone"] == bb and r["method"] == m]
            per = [Stat([]) for _ in domains]
            lper = [Stat([]) for _ in domains]
            tot, ltot = Stat([]), Stat([])
            for r in rs:
                t = r["test"]["age_group"]
                for i, dm in enumerate(t["domains"]):
                    if dm["auc"] is not None:
                        per[i].values.append(dm["auc"])
                    if dm["logloss"] is not None:
                        lper[i].values.append(dm["logloss"])
                if t["auc"] is not None:
                    tot.values.append(t["auc"])
                if t["logloss"] is not None:
                    ltot.values.append(t["logloss"])
            paper = PAPER_MULTILORA.get((bb, m))
            ptxt = "—" if paper is None else f"{paper:.4f}"
            diff = "—" if paper is None or tot.mean is None else f"{tot.mean - paper:+.4f}"
            cells = [s.fmt(1.0, 4) for s in per] + [tot.fmt(1.0, 4)]
            cells += [s.fmt(1.0, 4) for s in lper] + [ltot.fmt(1.0, 4)]
            paper_name = MULTILORA_PAPER_NAMES.get(m)
            name = LABELS[m] if paper_name is None else f"{paper_name} ({LABELS[m]})"
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {ptxt} | {diff} |")
        out += PROSE.lines(
            "multilora_backbone", backbone=BACKBONE_LABELS[bb],
            auc=" | ".join(f"AUC {d}" for d in domains),
            logloss=" | ".join(f"LogLoss {d}" for d in domains),
            align="---:|" * (2 * len(domains) + 4), rows="\n".join(rows),
        )  # fmt: skip
        out.append("")
    out += _param_table(recs)
    plot = plot_multilora(recs, docs_dir)
    if plot is not None:
        out += [PROSE.text("multilora_plot", file=plot.name), ""]
    out += _time_lines(records, sl, "multilora", missing)
    out += _not_run_block(missing)
    return out


def _param_table(recs: list[dict[str, Any]]) -> list[str]:
    """Table 7: trainable parameters per phase (models.freeze.phase_parameter_counts)."""
    rows = []
    for bb in MULTILORA_BACKBONES:
        r = next((r for r in recs if r["backbone"] == bb and r["method"] == TABLE7_METHOD
                  and r.get("param_counts")), None)  # fmt: skip
        if r is None:
            continue
        pc = r["param_counts"]
        backbone = pc.get("backbone", 0)
        lora = [v for k, v in pc.items() if k.startswith("lora:")]
        fusion = pc.get("fusion", 0)
        n_dom = 3
        one = lora[0] if lora else 0
        rows.append(
            f"| {BACKBONE_LABELS[bb]} | {backbone:,} | {n_dom * backbone:,} | "
            f"{one:,} ({100 * one / backbone:.1f}%) | {one // n_dom:,} "
            f"({100 * one / n_dom / backbone:.1f}%) | {sum(lora):,} | {fusion:,} | "
            f"{sum(lora) + fusion:,} ({100 * (sum(lora) + fusion) / backbone:.1f}%) |"
        )
    if not rows:
        return [*PROSE.lines("parameters_not_run"), ""]
    return [*PROSE.lines("parameters", rows="\n".join(rows)), ""]


def report_add_domain(records: list[dict[str, Any]], sl: Slice, results_dir: Path) -> list[str]:
    expected = build_grid(["add_domain"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    rows = []
    for bb in ADD_DOMAIN_BACKBONES:
        adds = _select(records, sl, table="add_domain", backbone=bb)
        base_full = Stat([])
        mlora_full = Stat([])
        for method, stat in (("base", base_full), ("mlora", mlora_full)):
            for r in _select(records, sl, table="table1", split="occupation", backbone=bb,
                             method=method):  # fmt: skip
                dm = next(d for d in r["test"]["occupation"]["domains"]
                          if d["domain"] == HOLDOUT_DOMAIN)  # fmt: skip
                if dm["auc"] is not None:
                    stat.values.append(dm["auc"])
        alone = Stat([r["test_new_domain"]["backbone"]["auc"] for r in adds])
        added = Stat([r["test_new_domain"]["added"]["auc"] for r in adds])
        unchanged = all(r.get("others_unchanged") for r in adds) if adds else None
        secs = Stat([r["add_domain"]["seconds"] for r in adds])
        grown = sorted(
            {f"{k} {v}" for r in adds for k, v in r["add_domain"].get("grown", {}).items()}
        )
        rows.append(
            f"| {BACKBONE_LABELS[bb]} | {alone.fmt()} | {added.fmt()} | {base_full.fmt()} | "
            f"{mlora_full.fmt()} | {'—' if secs.mean is None else f'{secs.mean:.0f} s'} | "
            f"{'—' if unchanged is None else ('yes' if unchanged else 'NO')} | "
            f"{', '.join(grown) or 'none'} |"
        )
    out = PROSE.lines("add_domain", domain=HOLDOUT_DOMAIN, name=HOLDOUT_NAME, rows="\n".join(rows))
    out.append("")
    out += _time_lines(records, sl, "add_domain", missing)
    out += _not_run_block(missing)
    return out


def location_options(settings: Settings) -> list[str]:
    """The command-line options that put a run's folders, data and threads where
    ``settings`` has them (none for the defaults)."""
    out = []
    for flag, value, default in (
        ("--data-dir", settings.data_dir, default_data_dir()),
        ("--results-dir", settings.results_dir, DEFAULT_RESULTS),
        ("--work-dir", settings.work_dir, DEFAULT_WORK),
        ("--docs-dir", settings.docs_dir, DEFAULT_DOCS),
    ):
        if Path(value).resolve() != Path(default).resolve():
            out.append(f"{flag} {shlex.quote(str(value))}")
    if settings.threads:
        out.append(f"--threads {settings.threads}")
    if settings.device != "auto":
        out.append(f"--device {settings.device}")
    return out


def write_report(settings: Settings, data_slice: Slice | None = None) -> Path:
    """Rebuild ``docs/results.md`` and the plots from the cached cells alone."""
    sl = data_slice if data_slice is not None else settings.data_slice
    results_dir, docs_dir = Path(settings.results_dir), Path(settings.docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    records = load_cache(results_dir)
    n_used = len(_select(records, sl))
    rel = _rel(results_dir)
    lines = PROSE.lines(
        "header", options="".join(f" {o}" for o in sl.options()), cells=n_used, results=rel,
        updated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )  # fmt: skip
    lines.append("")
    if not sl.is_full:
        lines += [PROSE.text("slice_warning", slice=sl.tag[1:]), ""]
    lines += summary_section(records, sl)
    lines += _setup_section(_select(records, sl))
    lines += report_table1(records, sl, results_dir, docs_dir)
    lines += report_figure2(records, sl, results_dir, docs_dir)
    lines += report_multilora(records, sl, results_dir, docs_dir)
    lines += report_add_domain(records, sl, results_dir)
    lines += amazon_section(Path(settings.results_dir).parent / "amazon")
    lines += _discussion(records, sl, results_dir)
    loc = location_options(settings)
    if loc:  # the commands shown must write where this run writes, not into the repository
        lines = [f"{ln} {' '.join(loc)}" if ln.startswith("mdlora reproduce") else ln
                 for ln in lines]  # fmt: skip
        i = next(i for i, ln in enumerate(lines) if ln.startswith("Generated by"))
        lines[i] = lines[i].replace("--report-only", "--report-only " + " ".join(loc), 1)
    path = docs_dir / "results.md"
    tmp = path.with_name(f".results.md.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path
