"""The result cache: one JSON file per finished cell, read back instead of re-run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mdlora.training.reproduce.grid import Cell


# ------------------------------------------------------------------------------ cache
def read_cell(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


def write_cell(path: Path, record: dict[str, Any]) -> None:
    """Write a cell's JSON atomically (a crash never leaves half a cached cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_cache(results_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        rec = read_cell(path)
        if rec is not None and "table" in rec:
            out.append(rec)
    return out


def _alias(cell: Cell, results_dir: Path) -> dict[str, Any] | None:
    """A cached cell of another table with the same training key (e.g. Figure 2's k=1)."""
    if cell.table == "figure2" and cell.experts == 1:
        twin = Cell("table1", cell.split, cell.backbone, cell.method, cell.seed, 1, cell.slice)
        rec = read_cell(twin.path(results_dir))
        if rec is not None:
            return {**rec, "table": cell.table, "cell": cell.cell_id, "label": cell.label,
                    "same_run_as": f"table1/{twin.cell_id}"}  # fmt: skip
    return None
