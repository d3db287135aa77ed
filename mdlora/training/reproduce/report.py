"""The Markdown report's tables (``docs/results.md``), rebuilt from the cache alone."""

from __future__ import annotations

import os
import shlex
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


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
    PAPER_MULTILORA,
    PAPER_TABLE1_AVG,
    PAPER_TABLE1_CELLS,
    TABLE1_BACKBONES,
    TABLE1_METHODS,
    TABLE1_SPLITS,
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


def _time_lines(records: list[dict[str, Any]], table: str, missing: list[Cell]) -> list[str]:
    recs = [r for r in records if r["table"] == table and not r.get("same_run_as")]
    spent = sum(r["seconds"] for r in recs)
    devices = sorted({r.get("device", "?").split(" (")[0] for r in recs})
    left = sum(estimate_seconds(c, records) for c in missing)
    line = f"Time: {len(recs)} cell(s) ran in {_hms(spent)} in total on {', '.join(devices) or '—'}"
    if missing:
        line += f"; the {len(missing)} cells not run would take about {_hms(left)} more"
        line += (" (estimated from the finished cells' durations, for one process; processes "
                 "run side by side share it)")  # fmt: skip
    return [line + ".", ""]


def _not_run_block(missing: list[Cell]) -> list[str]:
    if not missing:
        return []
    lines = ["Not run yet; these commands run the missing cells (resumable, cached per cell):", "",
             "```"]  # fmt: skip
    lines += _commands(missing)
    return [*lines, "```", ""]


def report_table1(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    stats = table1_stats(records, sl)
    expected = build_grid(["table1"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    out = ["## MoE-MLoRA Table 1: MovieLens-1M, WAUC %", ""]
    out += [
        "Base / MLoRA / MoE-MLoRA per backbone, mean ± standard deviation over the seeds run "
        "(n < 3 is marked). Base is the phase-1 backbone, shared with MLoRA and MoE-MLoRA "
        "(the same computation, trained once per backbone and seed). The paper reports one "
        "run per cell; its per-backbone numbers are quoted in ALGORITHMS.md only for DeepFM on "
        "gender (80.22 / 80.38 / 80.22), so the other rows are compared through the average.",
        "",
    ]
    for split in TABLE1_SPLITS:
        out += [f"### ML-{split}", ""]
        out.append("| backbone | Base | MLoRA | MoE-MLoRA | MLoRA − Base | MoE − Base | "
                   "paper (B / M / MoE) | note |")  # fmt: skip
        out.append("|---|---:|---:|---:|---:|---:|---|---|")
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
            out.append(
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
        out.append(
            f"| **average** | {cells[0]} | {cells[1]} | {cells[2]} | | | {pavg} "
            f"(ours − paper: {avg_diffs}) | |"
        )
        if not full:
            n_rows = len(col_means["base"])
            out += ["", f"\\* average over the {n_rows} backbone(s) with all three methods "
                    "run so far, not all eight."]  # fmt: skip
        out.append("")
        plot = plot_table1(stats, split, docs_dir)
        if plot is not None:
            out += [f"![Table 1, ML-{split}]({plot.name})", ""]
    out += _time_lines(records, "table1", missing)
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
    out = ["## MoE-MLoRA Figure 2: number of experts, ML-gender, WAUC %", ""]
    out += ["Total experts = 2 × k (k experts per domain). k = 1 is the Table 1 MoE-MLoRA cell. "
            "The paper shows this as a plot only (no numbers in ALGORITHMS.md).", ""]  # fmt: skip
    out.append("| backbone | " + " | ".join(f"{2 * k} experts" for k in FIGURE2_EXPERTS) + " |")
    out.append("|---|" + "---:|" * len(FIGURE2_EXPERTS))
    for bb in FIGURE2_BACKBONES:
        row = [stats.get((bb, k), Stat([])).fmt() for k in FIGURE2_EXPERTS]
        out.append(f"| {BACKBONE_LABELS[bb]} | " + " | ".join(row) + " |")
    out.append("")
    plot = plot_figure2(stats, docs_dir)
    if plot is not None:
        out += [f"![Figure 2]({plot.name})", ""]
    out += _time_lines(records, "figure2", missing)
    out += _not_run_block(missing)
    return out


def report_multilora(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    expected = build_grid(["multilora"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    recs = _select(records, sl, table="multilora")
    out = ["## MultiLoRA Tables 3-5 and 7: MovieLens-1M, 3 age groups (gender auxiliary)", ""]
    out += [
        "Per-domain AUC and LogLoss on the natural division (age groups 1-18, 25, 35-56), "
        "total AUC and LogLoss over all test rows; mean ± std over seeds. Mix is the Base "
        "backbone (phase 1, shared by Fine-tune and the LoRA methods). Paper: total AUC.",
        "",
    ]
    domains = ["1-18", "25", "35-56"]
    for bb in MULTILORA_BACKBONES:
        methods = MULTILORA_METHODS_MLP if bb == "mlp" else MULTILORA_METHODS_OTHER
        out += [f"### {BACKBONE_LABELS[bb]} backbone", ""]
        head = " | ".join(f"AUC {d}" for d in domains)
        lhead = " | ".join(f"LogLoss {d}" for d in domains)
        out.append(f"| method | {head} | total AUC | {lhead} | total LogLoss | paper total AUC "
                   "| ours − paper |")  # fmt: skip
        out.append("|---|" + "---:|" * (2 * len(domains) + 4))
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
            name = "Mix (Base)" if m == "base" else LABELS[m]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {ptxt} | {diff} |")
        out.append("")
    out += _param_table(recs)
    plot = plot_multilora(recs, docs_dir)
    if plot is not None:
        out += [f"![MultiLoRA total AUC]({plot.name})", ""]
    out += _time_lines(records, "multilora", missing)
    out += _not_run_block(missing)
    return out


def _param_table(recs: list[dict[str, Any]]) -> list[str]:
    """Table 7: trainable parameters per phase (models.freeze.phase_parameter_counts)."""
    rows = []
    for bb in MULTILORA_BACKBONES:
        r = next((r for r in recs if r["backbone"] == bb and r["method"] == "multilora"
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
        return ["Trainable parameters (Table 7): not run yet.", ""]
    return [
        "Trainable parameters (the paper's Table 7; counts from "
        "`mdlora.models.freeze.phase_parameter_counts`, a LoRA set includes its domain norms). "
        "Single and Fine-tune train a whole backbone per domain. The paper reports one LoRA "
        "set at about 2% of the backbone; ours is larger relative to a backbone whose "
        "embedding tables hold most of its weights (ML-1M's id vocabularies at dimension 16), "
        "and the LoRA count here includes the set's per-domain norms and row scales.",
        "",
        "| backbone | backbone | Single / Fine-tune (3 domains) | one LoRA set (natural) "
        "| one domain's LoRA | both LoRA sets | fusion + cell norms | MultiLoRA total added |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def report_add_domain(records: list[dict[str, Any]], sl: Slice, results_dir: Path) -> list[str]:
    expected = build_grid(["add_domain"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    out = [f"## Adding a domain without retraining: occupation {HOLDOUT_DOMAIN} "
           f"({HOLDOUT_NAME})", ""]  # fmt: skip
    out += [
        f"Occupation {HOLDOUT_DOMAIN} ({HOLDOUT_NAME}: 92 users, 11,345 ratings, the smallest "
        "occupation after farmer's 17 users) is held out; MLoRA is trained on the other 20 "
        "with the Table 1 setting and split, exported, and the domain is added through "
        "`mdlora.training.add_domain.add_domain` (what `mdlora add-domain` runs) on its training "
        "and "
        "validation rows. Its users appear in no other occupation, so their ids (and the "
        "occupation's own value of the domain field) are unknown to the model that never saw "
        "the domain: `add-domain` grows embedding rows for them and trains them with the "
        "domain's adapter, everything else frozen (before it did, the adapter alone reached "
        "65.33 ± 0.23 here: with every user out of vocabulary it could only shift the movies' "
        "scores). The test rows are the same as in the Table 1 occupation cells, whose "
        "per-domain AUC of this occupation is the full retraining.",
        "",
    ]
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
    out += [
        f"Test AUC % of occupation {HOLDOUT_DOMAIN}:",
        "",
        "| backbone | grown rows, no adapter | grown rows + added adapter | full retraining: "
        "Base | full retraining: MLoRA | add-domain time | other domains' scores unchanged | "
        "ids grown |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
    ]
    out += _time_lines(records, "add_domain", missing)
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
    lines = [
        "# Reproducing the papers' MovieLens tables",
        "",
        f"Generated by `mdlora reproduce --report-only{' ' + ' '.join(sl.options()) if sl.options() else ''}` "  # noqa: E501
        f"from {n_used} cached cells in `{rel}/` "
        f"(last update {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Numbers are "
        'never typed in by hand: a cell that has not run shows "not run" with the command '
        "that runs it. `mdlora reproduce` (no options) runs everything still missing, most "
        "important first; it is resumable, and `--device cuda` runs the same grid on a GPU.",
        "",
    ]
    if not sl.is_full:
        lines += [
            f"**This report covers a slice of the data/training ({sl.tag[1:]}), not the "
            "papers' setting: its numbers are not comparable with the papers'.**",
            "",
        ]
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
