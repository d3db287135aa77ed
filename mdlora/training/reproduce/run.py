"""The ``reproduce`` entry point: run what is missing, then rebuild the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mdlora.training.reproduce.grid import Cell, ReproduceError, Settings, Slice, build_grid
from mdlora.training.reproduce.report import write_report
from mdlora.training.reproduce.schedule import run_grid


def reproduce(
    settings: Settings,
    tables: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    report_only: bool = False,
    report_every: bool = True,
) -> tuple[list[dict[str, Any]], Path]:
    """The ``mdlora reproduce`` command: run the chosen cells, then rebuild the report.

    ``report_every`` rebuilds the report after each finished cell, so a long run's results
    page is always current.
    """
    new: list[dict[str, Any]] = []
    if not report_only:
        cells = build_grid(tables, splits, backbones, methods, seeds, settings.data_slice)
        if not cells:
            raise ReproduceError("the filters select no cell; see `mdlora reproduce --help`")

        def refresh(cell: Cell, record: dict[str, Any]) -> None:
            if report_every:
                write_report(settings)

        new = run_grid(cells, settings, refresh)
    return new, write_report(settings)


def with_slice(settings: Settings, sl: Slice) -> Settings:
    return replace(settings, data_slice=sl)
