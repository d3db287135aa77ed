"""Each method lives in ``mdlora/models/methods/``: the rest of the code asks the method object."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from mdlora.models.methods import REGISTRY, method_of
from mdlora.models.model import MultiDomainModel
from mdlora.models.state import adapter_tensors, install_adapter
from mdlora.training.amazon import RECIPES as AMAZON_RECIPES
from mdlora.training.config import RECIPES
from mdlora.training.reproduce.grid import ALL_METHODS
from tests.models.helpers import make_config, perturb

ROOT = Path(__file__).resolve().parents[2]
#: the names a branch could test: model methods, training recipes, the reproduce grid's methods
#: (``multilora-add``, ...) and the Amazon grid's recipes (``mlora_fresh``, ...)
NAMES = frozenset({*REGISTRY, *RECIPES, *ALL_METHODS, *AMAZON_RECIPES})
#: an operand named ``table`` / ``*_tables`` holds a reproduce table's name, not a method's
#: (the MultiLoRA table is named ``multilora``, after its paper)
TABLE_OPERAND = re.compile(r"(^|_)tables?$")
#: branches on a name left to their owners: (file, the comparison) -> why
KNOWN: dict[tuple[str, str], str] = {}


def _name(node: ast.expr) -> str | None:
    """The name a compared operand spells out (a string literal), if it is a known one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES:
        return node.value
    return None


def _is_table(node: ast.expr) -> bool:
    ident = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    return ident is not None and bool(TABLE_OPERAND.search(ident))


def _literal_options(node: ast.expr) -> list[ast.expr]:
    """The literal alternatives of ``x in <node>``: ``(...)``, ``[...]``, ``{...}`` and those
    wrapped in ``frozenset(...)`` / ``set(...)`` / ``tuple(...)`` / ``list(...)``."""
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in ("frozenset", "set", "tuple", "list") and len(node.args) == 1
    ):  # fmt: skip
        node = node.args[0]
    return list(node.elts) if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []


def _prefix_test(node: ast.Call) -> bool:
    """``x.startswith("multilora")`` / ``.endswith(...)`` with a name (or a tuple holding one)."""
    if not (
        isinstance(node.func, ast.Attribute)
        and node.func.attr in ("startswith", "endswith") and node.args
    ):  # fmt: skip
        return False
    arg = node.args[0]
    return bool(_name(arg) or any(_name(e) for e in _literal_options(arg)))


def name_tests(source: str) -> list[tuple[int, str]]:
    """Every test of a value against a method or recipe name in ``source``: ``==`` / ``!=`` /
    ``in`` / ``not in`` / ``is`` / ``is not`` with a name's string literal on either side (or
    among the literal alternatives of ``in (...)``, ``in frozenset({...})``), whatever the
    other side is called (``cfg.method``, ``r["method"]``, ``m``, ``c["recipe"]``),
    ``.startswith("name")`` / ``.endswith(...)``, and ``case "name":``. A name as a key
    (``stats[(split, b, "mlora")]``, ``(split, b, "mlora") in stats``), a loop over names and
    a name in a comment or docstring are no tests. (line, the comparison's source) each."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.MatchValue) and _name(node.value):
            found.append((node.lineno, ast.get_source_segment(source, node) or ""))
        if isinstance(node, ast.Call) and _prefix_test(node):
            found.append((node.lineno, ast.get_source_segment(source, node) or ""))
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, a, b in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)):
                continue
            if _is_table(a) or _is_table(b):
                continue
            options = _literal_options(b)
            membership = isinstance(op, (ast.In, ast.NotIn))
            if _name(a) or _name(b) or (membership and any(_name(e) for e in options)):
                found.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return found


def test_no_code_outside_the_method_room_branches_on_a_model_method_name() -> None:
    offenders, known = [], set()
    for folder in ("mdlora", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent == ROOT / "mdlora" / "models" / "methods":
                continue
            if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
                continue  # benchmarks/.venv-deepctr and the like: not ours
            rel = path.relative_to(ROOT).as_posix()
            for n, test in name_tests(path.read_text()):
                if (rel, test) in KNOWN:
                    known.add((rel, test))
                else:
                    offenders.append(f"{rel}:{n}: {test}")
    hint = "ask method_of(config), the recipe (cfg.recipe) or a table of names instead:\n"
    assert not offenders, hint + "\n".join(offenders)
    assert known == set(KNOWN), f"exemptions no longer needed: {sorted(set(KNOWN) - known)}"


@pytest.mark.parametrize(
    ("source", "branches"),
    [
        ('cfg.method == "moe"', True),
        ('method in ("mlora", "moe")', True),
        ('cfg.train_method not in ["multilora"]', True),
        ('[r for r in recs if r["method"] == "multilora"]', True),
        ("rec['method'] != 'singlelora'", True),
        ('r.get("method") in ("base", "single")', True),
        ('name = "Mix (Base)" if m == "base" else LABELS[m]', True),  # any variable's name
        ("f\"{'Mix' if m == 'base' else LABELS[m]} {x:.4f}\"", True),  # inside an f-string
        ('c["recipe"] == "mlora"', True),
        ('"mlora" in want_methods', True),
        ('"single" in (target, donor)', True),
        ('"multilora-add" != m', True),  # a reproduce grid method
        ('recipe == "mlora_fresh"', True),  # an Amazon recipe
        ('ok = (\n    m\n    == "moe"\n)', True),  # over several lines
        ('match m:\n    case "base" | "moe":\n        pass', True),
        ('r["method"] == m', False),  # a row of a method table, not a name test
        ('scope["method"] != "POST"', False),
        ('record = {"method": "mlora"}', False),
        ('for m in ("mlora", "moe"):\n    pass', False),  # a loop over names
        ('[stats[(s, b, "mlora")] for (s, b) in pairs if (s, b, "base") in stats]', False),
        ('if self.table == "multilora":\n    pass', False),  # a reproduce table's name
        ('"multilora" in want_tables and table != "multilora"', False),
        ('# if m == "base":\n"""m == "base" """', False),  # comments and docstrings
        ('m is "base"', True),
        ('m in frozenset({"mlora", "moe"})', True),
        ('name.startswith("multilora")', True),
        ('name.endswith(("x", "moe"))', True),
        ('path.startswith("runs/")', False),
    ],
)
def test_the_guard_sees_any_test_against_a_name(source: str, branches: bool) -> None:
    assert bool(name_tests(source)) is branches


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
