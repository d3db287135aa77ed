"""The reports' prose templates (``mdlora.training.prose``): blocks, placeholders, and that
every block the templates hold is one the code renders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdlora.training.prose import parse_blocks, template

ROOT = Path(__file__).resolve().parents[2]
#: each template and the modules that fill it
TEMPLATES = {
    ("mdlora.training.reproduce", "report_template.md"): [
        "mdlora/training/reproduce/report.py",
        "mdlora/training/reproduce/summary.py",
    ],
    ("mdlora.training", "amazon_template.md"): ["mdlora/training/amazon.py"],
}


def test_a_block_runs_to_the_next_marker_without_the_blank_lines_around_it() -> None:
    text = (
        "a note to the reader, not a block\n\n"
        "<!-- block: title -->\n\n# $name report\n\nCosts $$5 for ${count}x.\n\n\n"
        "<!-- block: tail -->\n; and more\n"
    )
    blocks = parse_blocks(text)
    assert list(blocks) == ["title", "tail"]
    assert blocks["title"].substitute(name="A", count=2) == "# A report\n\nCosts $5 for 2x."
    assert blocks["tail"].substitute() == "; and more"
    with pytest.raises(KeyError):  # a value left out is an error, not a blank
        blocks["title"].substitute(name="A")


def test_a_block_defined_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\['x'\]"):
        parse_blocks("<!-- block: x -->\none\n<!-- block: x -->\ntwo\n")


@pytest.mark.parametrize(("where", "modules"), list(TEMPLATES.items()))
def test_every_block_of_a_template_is_rendered_by_its_code(
    where: tuple[str, str], modules: list[str]
) -> None:
    blocks = template(*where).blocks
    assert blocks
    source = "\n".join((ROOT / m).read_text() for m in modules)
    used = set(re.findall(r"PROSE\.(?:text|lines)\(\s*\"(\w+)\"", source))
    assert used - set(blocks) == set(), "rendered but not in the template"
    assert set(blocks) - used == set(), "in the template but never rendered"
