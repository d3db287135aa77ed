"""Each method lives in ``mdlora/models/methods/``: the rest of the code asks the method object."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mdlora.models.methods import REGISTRY, method_of
from mdlora.models.model import MultiDomainModel
from mdlora.models.state import adapter_tensors, install_adapter
from mdlora.training.config import RECIPES
from tests.models.helpers import make_config, perturb

ROOT = Path(__file__).resolve().parents[2]
#: a branch on a model method's or a training recipe's name: ``cfg.method == "moe"``,
#: ``method in ("mlora", ...)``, ``cfg.method == "singlelora"``, and the same on a record's
#: field: ``r["method"] == "multilora"``, ``rec.get("method") != "moe"``, ``["method"] in (...)``
NAMES = "|".join(sorted({*REGISTRY, *RECIPES}, key=len, reverse=True))
BRANCH = re.compile(
    rf"""method(["']\s*[\])])?\s*(==|!=|in|not in)\s*[(\[{{]?\s*["']({NAMES})["']"""
)


def test_no_code_outside_the_method_room_branches_on_a_model_method_name() -> None:
    offenders = []
    for folder in ("mdlora", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent == ROOT / "mdlora" / "models" / "methods":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if BRANCH.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    hint = "ask method_of(config) or the recipe (cfg.recipe) instead:\n"
    assert not offenders, hint + "\n".join(offenders)


@pytest.mark.parametrize(
    ("line", "branches"),
    [
        ('if cfg.method == "moe":', True),
        ('if method in ("mlora", "moe"):', True),
        ('if cfg.train_method not in ["multilora"]:', True),
        ('rs = [r for r in recs if r["method"] == "multilora"]', True),
        ("if rec['method'] != 'singlelora':", True),
        ('if r.get("method") in ("base", "single"):', True),
        ('if r["method"] == m:', False),  # a row of a method table, not a name test
        ('if scope["method"] != "POST":', False),
        ('record = {"method": "mlora"}', False),
    ],
)
def test_the_branch_pattern_sees_attribute_and_subscript_forms(line: str, branches: bool) -> None:
    assert bool(BRANCH.search(line)) is branches


def test_unknown_methods_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        method_of("lora-ish")
    assert set(REGISTRY) == {"base", "mlora", "moe", "multilora"}


@pytest.mark.parametrize("method", ["mlora", "moe2", "multilora"])
def test_a_domains_tensors_save_and_load_through_one_map(method: str) -> None:
    """``slots`` is read to save a domain and written to load it: a round trip through
    another model reproduces the domain's scores-relevant tensors exactly."""
    src = perturb(MultiDomainModel(make_config("deepfm", method)), seed=3)
    dst = MultiDomainModel(make_config("deepfm", method))
    division = src.config.divisions[0].name
    domain = src.domain_names(division)[1]
    tensors = adapter_tensors(src, division, domain)
    install_adapter(dst, division, domain, tensors)
    again = adapter_tensors(dst, division, domain)
    assert tensors.keys() == again.keys()
    for k in tensors:
        assert torch.equal(tensors[k], again[k]), k
