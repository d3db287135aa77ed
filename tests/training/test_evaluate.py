"""Evaluation metrics against scikit-learn on hand-made examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from mdlora.training.evaluate import SplitMetrics, compute_metrics, markdown_table

LABELS = np.array([1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1], dtype=np.float32)
PROBS = np.array([0.9, 0.2, 0.4, 0.5, 0.1, 0.8, 0.3, 0.35, 0.6, 0.05, 0.7, 0.2])
DOMAINS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2])  # domain 2 has positives only


def test_per_domain_auc_and_logloss_match_sklearn() -> None:
    m = compute_metrics(LABELS, PROBS, DOMAINS, ["a", "b", "c"], "div")
    for d, name in enumerate("ab"):
        sel = np.equal(DOMAINS, d)
        assert m.domain(name).auc == pytest.approx(roc_auc_score(LABELS[sel], PROBS[sel]))
        assert m.domain(name).logloss == pytest.approx(log_loss(LABELS[sel], PROBS[sel]))
        assert m.domain(name).n == sel.sum()
    assert m.domain("a").auc == pytest.approx(0.75)  # 3 of the 4 positive/negative pairs
    assert m.auc == pytest.approx(roc_auc_score(LABELS, PROBS))
    assert m.logloss == pytest.approx(log_loss(LABELS, PROBS))


def test_wauc_weights_by_test_counts_and_skips_one_class_domains() -> None:
    m = compute_metrics(LABELS, PROBS, DOMAINS, ["a", "b", "c"], "div")
    auc_a, auc_b = m.domain("a").auc, m.domain("b").auc
    assert auc_a is not None and auc_b is not None
    assert m.wauc == pytest.approx((4 * auc_a + 6 * auc_b) / 10)
    assert m.mean_auc == pytest.approx((auc_a + auc_b) / 2)
    assert m.domain("c").auc is None and m.excluded == ["c"]
    assert m.domain("c").logloss == pytest.approx(log_loss([1, 1], [0.7, 0.2], labels=[0, 1]))


def test_a_domain_without_rows_is_reported_empty() -> None:
    m = compute_metrics(LABELS, PROBS, DOMAINS, ["a", "b", "c", "d"], "div")
    assert m.domain("d").n == 0 and m.domain("d").auc is None and m.domain("d").logloss is None
    assert "d" not in m.excluded


def test_json_round_trip_and_markdown_mention_exclusions() -> None:
    m = compute_metrics(LABELS, PROBS, DOMAINS, ["a", "b", "c"], "div")
    assert SplitMetrics.from_dict(m.to_dict()) == m
    md = markdown_table({"Base": m, "MLoRA": m})
    assert "| **WAUC** |" in md and "| a | 4 |" in md
    assert "left out of WAUC): ['c']" in md


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ"):
        compute_metrics(LABELS[:3], PROBS, DOMAINS, ["a", "b", "c"])
