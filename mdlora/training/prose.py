"""The reports' prose, kept in Markdown templates beside the code that fills them.

A template file holds named blocks. A block starts at a line ``<!-- block: NAME -->`` and runs
to the next such line; the blank lines around it only lay the file out and are not part of it
(text before the first block is a note to the reader). A block's ``$name`` / ``${name}``
placeholders are filled by :class:`string.Template` (a literal dollar is ``$$``); a placeholder
left without a value raises ``KeyError`` rather than printing a blank. The code computes the
values (numbers, table rows, commands) and decides which blocks a report shows; the words are
the template's.

``string.Template`` rather than ``str.format_map``: the prose quotes code and Markdown, where
braces are ordinary text, and formatting stays in the code that computes the numbers.
"""

from __future__ import annotations

import re
from functools import cache, cached_property
from importlib.resources import files
from string import Template

_BLOCK = re.compile(r"^<!-- block: (\w+) -->$", re.MULTILINE)


@cache
def template(package: str, resource: str) -> Prose:
    """The template ``resource`` shipped in ``package`` (one object per file, read on first
    use)."""
    return Prose(package, resource)


class Prose:
    """The blocks of one template file shipped in ``package``."""

    def __init__(self, package: str, resource: str) -> None:
        self.package = package
        self.resource = resource

    @cached_property
    def blocks(self) -> dict[str, Template]:
        text = files(self.package).joinpath(self.resource).read_text(encoding="utf-8")
        return parse_blocks(text, self.resource)

    def text(self, block: str, **values: object) -> str:
        """Block ``block`` with its placeholders filled from ``values``."""
        return self.blocks[block].substitute(values)

    def lines(self, block: str, **values: object) -> list[str]:
        """:meth:`text` as lines (the reports are built as lists of lines)."""
        return self.text(block, **values).split("\n")


def parse_blocks(text: str, source: str = "template") -> dict[str, Template]:
    """The named blocks of a template's ``text`` (see the module docstring)."""
    parts = _BLOCK.split(text)  # [note, name, body, name, body, ...]
    names, bodies = parts[1::2], parts[2::2]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{source}: block(s) {twice} defined more than once")
    return {n: Template(b.strip("\n")) for n, b in zip(names, bodies, strict=True)}
