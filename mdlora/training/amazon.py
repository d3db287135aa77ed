"""Real-data experiments on the 3-domain Amazon-2014 set (sports, toys, office).

Users and items are distinct per category, so a domain added later brings only ids the
export never saw: the experiment that shows whether ``add-domain`` can take a new domain
without retraining.

``new_domain_cell``: train an export on two categories, add the third with ``add-domain``
(embedding rows grown for its users and items), and compare it with a full retraining that
included the third category from the start: test AUC on the third category's leave-last-out
test rows, wall time of each, and whether the old categories' scores stayed bit-identical.

Every cell writes one small JSON file; a finished cell is read back, never re-run, so the
command can be stopped and started again (``mdlora reproduce-amazon``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdlora.formats.artifact import load_artifact
from mdlora.training.add_domain import AddDomainSettings, add_domain
from mdlora.training.config import DEFAULT_ALPHA, REPO_ROOT, TrainConfig, config_from_dict
from mdlora.training.data.presets import MOVIELENS_ALPHA
from mdlora.training.evaluate import compute_metrics
from mdlora.training.prose import template

AMAZON = REPO_ROOT.parent / "shared/data/amazon2014-3domain-dev/amazon2014_3domain_dev.parquet"
SCHEMA = {"label": "label", "divisions": ["domain"], "sparse": ["user", "item", "domain"]}


@dataclass
class CellSettings:
    backbone: str = "deepfm"
    method: str = "mlora"
    epochs: int = 10
    patience: int = 2
    batch_size: int = 2048
    threads: int | None = None
    device: str = "auto"
    add_epochs: int = 10
    add_lr: float = 0.001
    progress: bool = False


def _config(
    name: str,
    table: Path,
    out: Path,
    seed: int,
    s: CellSettings,
    divisions: list[str] | None = None,
    **extra: Any,
) -> TrainConfig:
    schema = {**SCHEMA, "divisions": divisions or SCHEMA["divisions"]}
    return config_from_dict({
        "name": name,
        "data": {"source": "table", "path": str(table), "schema": schema,
                 "options": {"split_column": "split", "seed": seed}},
        "method": s.method,
        "model": {"backbone": s.backbone, "embed_dim": 8, "tower": [256, 128, 64],
                  # the rank temperatures every cached cell was trained with (MLoRA's
                  # MovieLens values, the default for own data before it became
                  # DEFAULT_ALPHA): DeepFM 8-4-2, DCN 16-8-4
                  "alpha": MOVIELENS_ALPHA.get(s.backbone, DEFAULT_ALPHA), "dropout": 0.5},
        "lr": 0.001, "batch_size": s.batch_size, "l2": 1e-5,
        "epochs": s.epochs, "patience": s.patience, "seed": seed, "threads": s.threads,
        "device": s.device, "progress": s.progress, "export": True, "onnx": False, "resume": True,
        "out": str(out), **extra,
    })  # fmt: skip


def _tables(data: Path, work: Path, new: str) -> tuple[Path, Path, Path, pd.DataFrame]:
    """(all rows, the export's rows, the new domain's train+val rows, its test rows)."""
    work.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(data)
    if new not in set(df["domain"]):
        raise ValueError(
            f"{data}: no rows of domain {new!r} (domains: {sorted(set(df['domain']))})"
        )
    old_path, new_path = work / "old.parquet", work / "new.parquet"
    if not old_path.exists():
        df[df["domain"] != new].to_parquet(old_path)
    is_new = df["domain"] == new
    if not new_path.exists():
        df[is_new & (df["split"] != "test")].to_parquet(new_path)
    test = df[is_new & (df["split"] == "test")].reset_index(drop=True)
    return data, old_path, new_path, test


def _seconds(phases: list[Any]) -> float:
    return float(sum(p.seconds for p in phases))


def _auc(artifact: Path, rows: pd.DataFrame) -> float:
    records: list[dict[str, Any]] = rows[["user", "item", "domain"]].to_dict("records")  # type: ignore[assignment]
    scores = load_artifact(artifact).score(records)
    m = compute_metrics(
        rows["label"].to_numpy(), scores, np.zeros(len(rows), np.int64), ["x"]
    ).domains[0].auc  # fmt: skip
    assert m is not None
    return float(m)


def new_domain_cell(
    data: Path,
    work: Path,
    seed: int,
    settings: CellSettings | None = None,
    new: str = "office",
    results: Path | None = None,
) -> dict[str, Any]:
    """One seed of the new-domain experiment (see the module docstring); its record is cached
    in ``results`` (default ``work``)."""
    s = settings or CellSettings()
    tag = f"{s.backbone}-{s.method}-seed{seed}"
    result_file = (results or work) / f"new-domain-{new}-{tag}.json"
    if result_file.exists():
        return dict(json.loads(result_file.read_text()))
    all_path, old_path, new_path, test = _tables(data, work / "tables", new)
    from mdlora.training.run import run_training

    t0 = time.perf_counter()
    export_run = run_training(_config(f"export-{tag}", old_path, work / f"export-{tag}", seed, s))
    t_export = time.perf_counter() - t0
    export = export_run.artifacts[0]
    t0 = time.perf_counter()
    add = add_domain(
        export, new_path, new, division="domain", out=work / f"pkg-{tag}",
        artifact_out=work / f"grown-{tag}",
        settings=AddDomainSettings(epochs=s.add_epochs, lr=s.add_lr, seed=seed,
                                   device=s.device, progress=s.progress),
    )  # fmt: skip
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    full_run = run_training(_config(f"full-{tag}", all_path, work / f"full-{tag}", seed, s))
    t_full = time.perf_counter() - t0
    full = full_run.artifacts[0]
    old_test = pd.read_parquet(old_path)
    old_test = old_test[old_test["split"] == "test"].sample(
        min(20_000, int((old_test["split"] == "test").sum())), random_state=seed
    )
    records: list[dict[str, Any]] = old_test[["user", "item", "domain"]].to_dict("records")  # type: ignore[assignment]
    identical = bool(np.array_equal(
        load_artifact(export).score(records), load_artifact(work / f"grown-{tag}").score(records)
    ))  # fmt: skip
    result = {
        "seed": seed, "backbone": s.backbone, "method": s.method, "new_domain": new,
        "auc_add_domain": _auc(work / f"grown-{tag}", test),
        "auc_full_retraining": _auc(full, test),
        # training time of the runs as trained (their phases; a resumed run reads them back)
        "seconds_add_domain": t_add, "seconds_add_domain_phases": _seconds(add.phases),
        "seconds_full_retraining": _seconds(full_run.phases),
        "seconds_export_training": _seconds(export_run.phases),
        "wall_seconds": {"export": t_export, "add_domain": t_add, "full": t_full},
        "grown_ids": add.grown, "rows_train": add.rows_train, "rows_val": add.rows_val,
        "val_auc_backbone": add.val_auc_backbone, "val_auc": add.val_auc,
        "old_domains_bit_identical": identical, "old_rows_compared": len(records),
        "test_rows": len(test),
    }  # fmt: skip
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- the grid
#: the recipes compared on the existing domains: (cell name, method, overrides). One run of
#: each gives two rows of the table: the method and its own phase-1 backbone (``reference``).
#: ``_fresh``: each category's 20% of training rows with the highest ``seq_pos`` (late in the
#: users' histories, so leaning to long ones) are held out of phase 1 and train the later
#: phases; ``_fresh_random``: a stratified random 20% instead.
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "mlora": ("mlora", {"adapt_rows": "all"}),  # the papers' two phases; reference = Base
    "mlora_fresh": ("mlora", {"adapt_rows": "fresh", "adapt_order": "seq_pos"}),
    "finetune_fresh": ("finetune_fresh", {"adapt_rows": "fresh", "adapt_order": "seq_pos"}),
    "mlora_fresh_random": ("mlora", {"adapt_rows": "fresh"}),
    "finetune_fresh_random": ("finetune_fresh", {"adapt_rows": "fresh"}),
    "mlora_joint": ("mlora_joint", {"adapt_rows": "all"}),
    "moe": ("moe", {"adapt_rows": "all"}),  # MoE-MLoRA, two phases; reference = Base
    "moe_fresh": ("moe", {"adapt_rows": "fresh", "adapt_order": "seq_pos"}),
    # MultiLoRA: user activeness (active / casual) is its auxiliary division
    "multilora": ("multilora", {"adapt_rows": "all"}),
    "multilora_fresh": ("multilora", {"adapt_rows": "fresh", "adapt_order": "seq_pos"}),
}
#: the divisions a recipe's model routes by (the first is the one reported); default: domain
DIVISIONS: dict[str, list[str]] = {
    "multilora": ["domain", "activeness"],
    "multilora_fresh": ["domain", "activeness"],
}


def grid_cell(
    data: Path, results: Path, work: Path, recipe: str, seed: int, settings: CellSettings
) -> dict[str, Any]:
    """One recipe x seed on all three categories (cached as ``results/<cell>.json``)."""
    s = settings
    name = f"{recipe}-{s.backbone}-seed{seed}"
    result_file = results / f"{name}.json"
    if result_file.exists():
        return dict(json.loads(result_file.read_text()))
    from mdlora.training.run import run_training

    method, over = RECIPES[recipe]
    cfg = _config(
        name, data, work / name, seed, CellSettings(**{**s.__dict__, "method": method}),
        DIVISIONS.get(recipe), **{**over, "export": False},
    )  # fmt: skip
    t0 = time.perf_counter()
    run = run_training(cfg)
    primary = run.primary

    def per_domain(m: Any) -> dict[str, float | None]:
        return {d.domain: d.auc for d in m.domains}

    record = {
        "recipe": recipe, "method": method, "backbone": s.backbone, "seed": seed,
        "overrides": over, "seconds": time.perf_counter() - t0,
        "test": {"auc": per_domain(run.test[primary]), "wauc": run.test[primary].wauc},
        "reference": None if run.reference is None else {
            "label": run.reference_label, "auc": per_domain(run.reference[primary]),
            "wauc": run.reference[primary].wauc,
        },
        "phases": [p.to_dict() for p in run.phases],
        "adapt_rows": run.adapt_rows,
    }  # fmt: skip
    results.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(record, indent=2, default=str))
    return record


# ---------------------------------------------------------------------------- the report
#: the report's prose (``mdlora/training/amazon_template.md``)
PROSE = template("mdlora.training", "amazon_template.md")
#: the recipe (of :data:`RECIPES`) whose own reference is plain Base: its phase 1 is the
#: backbone trained on every training row, so a recipe without a phase 1 of its own
#: (``mlora_joint``) is compared with that reference of the same seed
BASE_REFERENCE_RECIPE = "mlora"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    a = np.asarray(xs) * 100
    return f"{a.mean():.2f}" + (f" ± {a.std(ddof=1):.2f}" if len(a) > 1 else "")


def report(results: Path) -> str:
    """The Markdown section of every finished cell under ``results`` (no claim beyond them)."""
    cells = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    new = [c for c in cells if "auc_add_domain" in c]
    grid = [c for c in cells if "recipe" in c]
    backbones = ", ".join(sorted({str(c.get("backbone")) for c in cells}))
    out = [*PROSE.lines("report", backbones=backbones), ""]
    if new:
        rows = []
        for c in new:
            diff = 100 * (c["auc_add_domain"] - c["auc_full_retraining"])
            ratio = c["seconds_add_domain"] / c["seconds_full_retraining"]
            grown = ", ".join(f"{k} {v}" for k, v in c["grown_ids"].items())
            same = "yes" if c["old_domains_bit_identical"] else "NO"
            rows.append(
                f"| {c['seed']} | {c['backbone']} | {_pct(c['auc_add_domain'])} | "
                f"{_pct(c['auc_full_retraining'])} | {diff:+.2f} | {c['seconds_add_domain']:.0f} s "
                f"| {c['seconds_full_retraining']:.0f} s | {ratio:.2f} | {grown} | "
                f"{same} ({c['old_rows_compared']} rows) |"
            )
        out += [*PROSE.lines("new_domain", rows="\n".join(rows)), ""]
    if grid:
        out += _grid_section(grid)
    return "\n".join(out)


def _grid_section(grid: list[dict[str, Any]]) -> list[str]:
    """Per recipe: test AUC per category and WAUC (mean ± sd over seeds), and the paired
    difference from the recipe's own phase-1 backbone, seed by seed."""
    doms = ("sports", "toys", "office")
    rows = []
    for backbone in sorted({c["backbone"] for c in grid}, key=lambda b: (b != "deepfm", b)):
        of_backbone = [c for c in grid if c["backbone"] == backbone]
        # a recipe without a phase 1 of its own (joint) is compared with Base of the same seed
        base = {c["seed"]: c["reference"] for c in of_backbone
                if c["recipe"] == BASE_REFERENCE_RECIPE and c.get("reference")}  # fmt: skip
        for recipe in RECIPES:
            cells = sorted((c for c in of_backbone if c["recipe"] == recipe),
                           key=lambda c: c["seed"])  # fmt: skip
            if not cells:
                continue
            per = [_mean_std([c["test"]["auc"][d] for c in cells if c["test"]["auc"].get(d)])
                   for d in doms]  # fmt: skip
            ref_of = {c["seed"]: c.get("reference") or base.get(c["seed"]) for c in cells}
            refs = [r["wauc"] for r in ref_of.values() if r]
            deltas = [
                f"{100 * (c['test']['wauc'] - ref['wauc']):+.2f}"
                for c in cells if (ref := ref_of[c["seed"]]) is not None
            ]  # fmt: skip
            later = [c["phases"][1:] for c in cells]
            moved = sum(any(p.get("best_step") for p in ph) for ph in later)
            changed = f"{moved} of {len(cells)}" if any(later) else "—"
            rows.append(
                f"| {backbone} | {recipe} | {len(cells)} | {' | '.join(per)} | "
                f"{_mean_std([c['test']['wauc'] for c in cells])} | {_mean_std(refs)} | "
                f"{', '.join(deltas) or '—'} | {changed} |"
            )
    return [*PROSE.lines("grid", rows="\n".join(rows)), ""]
