"""The report's PNG plots (matplotlib, headless)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mdlora.training.reproduce.grid import (
    BACKBONE_LABELS,
    FIGURE2_BACKBONES,
    FIGURE2_EXPERTS,
    LABELS,
    MULTILORA_METHODS_MLP,
    PAPER_MULTILORA,
    PAPER_TABLE1_AVG,
    TABLE1_BACKBONES,
    TABLE1_METHODS,
)
from mdlora.training.reproduce.stats import Stat


# ------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> Path:
    """Save a figure atomically (several workers may rebuild the report at once)."""
    plt = _plt()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table1(stats: dict[tuple[str, str, str], Stat], split: str, docs_dir: Path) -> Path | None:
    """Grouped bars of the three methods per backbone, error bars = std over seeds."""
    if not any(k[0] == split for k in stats):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.27
    lo, hi = math.inf, -math.inf
    for j, m in enumerate(TABLE1_METHODS):
        xs, ys, es = [], [], []
        for i, bb in enumerate(TABLE1_BACKBONES):
            s = stats.get((split, bb, m))
            if s is None or s.mean is None:
                continue
            xs.append(i + (j - 1) * width)
            ys.append(100 * s.mean)
            es.append(100 * (s.std or 0.0))
            lo, hi = min(lo, ys[-1] - es[-1]), max(hi, ys[-1] + es[-1])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=LABELS[m], color=f"C{j}")
    for j, m in enumerate(TABLE1_METHODS):
        ax.axhline(PAPER_TABLE1_AVG[split][m], ls="--", lw=0.8, color=f"C{j}")
    lo = min(lo, min(PAPER_TABLE1_AVG[split].values()))
    hi = max(hi, max(PAPER_TABLE1_AVG[split].values()))
    ax.set_ylim(lo - 0.3, hi + 0.3)
    ax.set_xticks(range(len(TABLE1_BACKBONES)))
    ax.set_xticklabels([BACKBONE_LABELS[b] for b in TABLE1_BACKBONES])
    ax.set_ylabel("test WAUC %")
    ax.set_title(f"ML-{split}: bars ours (± std over seeds), dashed lines the paper's averages")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    path = Path(docs_dir) / f"results_table1_{split}.png"
    return _save(fig, path)


def plot_figure2(stats: dict[tuple[str, int], Stat], docs_dir: Path) -> Path | None:
    if not stats:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for bb in FIGURE2_BACKBONES:
        pts = [(2 * k, stats[(bb, k)]) for k in FIGURE2_EXPERTS if (bb, k) in stats]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [100 * (p[1].mean or 0) for p in pts],
                    yerr=[100 * (p[1].std or 0) for p in pts], marker="o", capsize=3,
                    label=BACKBONE_LABELS[bb])  # fmt: skip
    ax.set_xticks([2 * k for k in FIGURE2_EXPERTS])
    ax.set_xlabel("experts in total (gender: 2 domains)")
    ax.set_ylabel("test WAUC %")
    ax.set_title("MoE-MLoRA, ML-gender: number of experts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(docs_dir) / "results_figure2_experts.png"
    return _save(fig, path)


def plot_multilora(recs: list[dict[str, Any]], docs_dir: Path) -> Path | None:
    mlp = [r for r in recs if r["backbone"] == "mlp"]
    if not mlp:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs, ys, es, ps = [], [], [], []
    for i, m in enumerate(MULTILORA_METHODS_MLP):
        s = Stat([r["test"]["age_group"]["auc"] for r in mlp if r["method"] == m])
        xs.append(i)
        ys.append(s.mean or math.nan)
        es.append(s.std or 0.0)
        ps.append(PAPER_MULTILORA.get(("mlp", m), math.nan))
    ax.bar(xs, ys, 0.6, yerr=es, capsize=3, label="ours")
    ax.plot(xs, ps, "k_", markersize=18, mew=2, label="paper")
    vals = [v for v in ys + ps if not math.isnan(v)]
    ax.set_ylim(min(vals) - 0.01, max(vals) + 0.01)
    ax.set_xticks(xs)
    ax.set_xticklabels([LABELS[m] for m in MULTILORA_METHODS_MLP], rotation=20, fontsize=8)
    ax.set_ylabel("total test AUC")
    ax.set_title("MultiLoRA setting, MLP backbone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(docs_dir) / "results_multilora_mlp.png"
    return _save(fig, path)
