"""Evaluation: exact per-domain AUC, WAUC, per-domain and total LogLoss; JSON, Markdown, rich.

* AUC is scikit-learn's ``roc_auc_score`` on each domain's rows (exact, no thresholds).
* WAUC = sum_d n_test(d) * AUC_d / sum_d n_test(d), over the domains whose AUC is defined.
* A domain whose rows are all of one class has no AUC: it is reported as ``null``, left out
  of WAUC and of the mean AUC, and listed under ``excluded`` (the tables say so).
* LogLoss is scikit-learn's ``log_loss`` (labels fixed to 0/1, so one-class domains work).
* ``mean_auc`` (the unweighted mean of per-domain AUCs) is the early-stopping metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


@dataclass
class DomainMetrics:
    domain: str
    n: int
    positives: int
    auc: float | None  # None: one class only (or no rows)
    logloss: float | None  # None: no rows


@dataclass
class SplitMetrics:
    """Metrics of one split under one division."""

    division: str
    domains: list[DomainMetrics]
    wauc: float | None
    mean_auc: float | None
    auc: float | None  # over all rows, ignoring domains ("total AUC")
    logloss: float | None  # over all rows
    n: int
    excluded: list[str] = field(default_factory=list)  # domains without an AUC

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitMetrics:
        d = dict(d)
        d["domains"] = [DomainMetrics(**x) for x in d["domains"]]
        return cls(**d)

    def domain(self, name: str) -> DomainMetrics:
        for m in self.domains:
            if m.domain == name:
                return m
        raise KeyError(f"no domain {name!r} in these metrics")


def _auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, probs))


def _logloss(labels: np.ndarray, probs: np.ndarray) -> float | None:
    if labels.size == 0:
        return None
    return float(log_loss(labels, probs.astype(np.float64), labels=[0, 1]))


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    division: str = "domain",
) -> SplitMetrics:
    """Per-domain and overall metrics of predicted click probabilities ``probs``."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    domain_ids = np.asarray(domain_ids).ravel()
    if not labels.shape == probs.shape == domain_ids.shape:
        raise ValueError(
            f"labels {labels.shape}, probs {probs.shape} and domains {domain_ids.shape} differ"
        )
    if labels.size and (domain_ids.min() < 0 or domain_ids.max() >= len(domain_names)):
        raise ValueError(f"domain ids outside [0, {len(domain_names)}) in the evaluation rows")
    per: list[DomainMetrics] = []
    for d, name in enumerate(domain_names):
        sel = domain_ids == d
        y, p = labels[sel], probs[sel]
        per.append(DomainMetrics(name, int(sel.sum()), int(y.sum()), _auc(y, p), _logloss(y, p)))
    scored = [m for m in per if m.auc is not None]
    weight = sum(m.n for m in scored)
    wauc = sum(m.n * m.auc for m in scored if m.auc is not None) / weight if weight else None
    aucs = [m.auc for m in scored if m.auc is not None]
    return SplitMetrics(
        division=division,
        domains=per,
        wauc=wauc,
        mean_auc=float(np.mean(aucs)) if aucs else None,
        auc=_auc(labels, probs),
        logloss=_logloss(labels, probs),
        n=int(labels.size),
        excluded=[m.domain for m in per if m.auc is None and m.n > 0],
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def markdown_table(results: dict[str, SplitMetrics]) -> str:
    """One Markdown table per division: rows are domains, columns the runs in ``results``.

    ``results`` maps a run label (e.g. ``"Base"``, ``"MLoRA"``) to its test metrics; all runs
    must share the division and domains.
    """
    if not results:
        return ""
    labels = list(results)
    first = results[labels[0]]
    lines = [f"Division `{first.division}`: AUC % (LogLoss)", ""]
    lines.append("| domain | n | " + " | ".join(labels) + " |")
    lines.append("|---|---:|" + "---:|" * len(labels))
    for i, dm in enumerate(first.domains):
        cells = []
        for lab in labels:
            m = results[lab].domains[i]
            cells.append(f"{_pct(m.auc)} ({_num(m.logloss)})")
        lines.append(f"| {dm.domain} | {dm.n} | " + " | ".join(cells) + " |")
    lines.append("| **WAUC** | | " + " | ".join(_pct(results[x].wauc) for x in labels) + " |")
    lines.append("| mean AUC | | " + " | ".join(_pct(results[x].mean_auc) for x in labels) + " |")
    lines.append("| total AUC | | " + " | ".join(_pct(results[x].auc) for x in labels) + " |")
    lines.append(
        "| total LogLoss | | " + " | ".join(_num(results[x].logloss) for x in labels) + " |"
    )
    excluded = sorted({d for x in labels for d in results[x].excluded})
    if excluded:
        lines += ["", f"Domains with one class only (AUC n/a, left out of WAUC): {excluded}"]
    return "\n".join(lines) + "\n"


def print_summary(results: dict[str, SplitMetrics], title: str = "Test metrics") -> None:
    """The same table as :func:`markdown_table`, printed with rich."""
    from rich.console import Console
    from rich.table import Table

    if not results:
        return
    labels = list(results)
    first = results[labels[0]]
    table = Table(title=f"{title} (division {first.division!r}; AUC %, LogLoss)")
    table.add_column("domain")
    table.add_column("n", justify="right")
    for lab in labels:
        table.add_column(lab, justify="right")
    for i, dm in enumerate(first.domains):
        cells = [f"{_pct(results[x].domains[i].auc)} ({_num(results[x].domains[i].logloss)})"
                 for x in labels]  # fmt: skip
        table.add_row(dm.domain, str(dm.n), *cells)
    table.add_section()
    best = max((results[x].wauc or -1.0) for x in labels)
    table.add_row(
        "WAUC", "",
        *[f"[bold]{_pct(results[x].wauc)}[/bold]" if results[x].wauc == best
          else _pct(results[x].wauc) for x in labels],
    )  # fmt: skip
    table.add_row("mean AUC", "", *[_pct(results[x].mean_auc) for x in labels])
    table.add_row("total AUC", "", *[_pct(results[x].auc) for x in labels])
    table.add_row("total LogLoss", "", *[_num(results[x].logloss) for x in labels])
    console = Console()
    console.print(table)
    excluded = sorted({d for x in labels for d in results[x].excluded})
    if excluded:
        console.print(f"Domains with one class only (AUC n/a, left out of WAUC): {excluded}")
