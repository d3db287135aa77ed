"""Walking the grid: estimates, per-group locks (several workers), progress."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mdlora.training.reproduce.cache import _alias, load_cache, write_cell
from mdlora.training.reproduce.data import DataCache
from mdlora.training.reproduce.grid import Cell, Settings, Slice, check_data
from mdlora.training.reproduce.runner import run_cell


# ------------------------------------------------------------------------------- grid
def estimate_seconds(cell: Cell, done: list[dict[str, Any]]) -> float:
    """A cell's expected duration from finished cells like it (same table, method, split),
    of its own data slice where any finished (a quick slice's cells say little of a full
    run's, and the other way round)."""
    own = [r for r in done if Slice.from_dict(r.get("slice") or {}) == cell.slice]
    done = own or done

    def mean_of(pred: Callable[[dict[str, Any]], bool]) -> float | None:
        xs = [r["seconds"] for r in done if pred(r) and not r.get("same_run_as")]
        return statistics.fmean(xs) if xs else None

    for pred in (
        lambda r: (
            (r["table"], r["method"], r["split"], r["backbone"])
            == (cell.table, cell.method, cell.split, cell.backbone)
        ),
        lambda r: (r["table"], r["method"], r["split"]) == (cell.table, cell.method, cell.split),
        lambda r: (r["table"], r["method"]) == (cell.table, cell.method),
        lambda r: r["table"] == cell.table,
        lambda r: True,
    ):
        m = mean_of(pred)
        if m is not None:
            return m
    return 120.0


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class GroupLock:
    """A lock file per group, so several ``mdlora reproduce`` processes can share one grid.

    Each worker runs only cells whose group no other live process holds; a lock left by a
    dead process is taken over.
    """

    def __init__(self, work_dir: Path, group: str) -> None:
        self.path = Path(work_dir) / f"{group}.lock"

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {platform.node()}")
            return True
        return False

    def _holder_alive(self) -> bool:
        try:
            pid_text, _, host = self.path.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return False
        if host and host != platform.node():
            return True  # another machine's process: cannot check, assume alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def run_grid(
    cells: list[Cell],
    settings: Settings,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell not yet cached (progress bar with an ETA); returns the new records.

    Cells whose group another ``mdlora reproduce`` process is working on are deferred and
    retried after the others; they are left to that process if it still holds them at the end.
    """
    from tqdm.auto import tqdm

    results_dir = Path(settings.results_dir)
    todo = [c for c in cells if not c.path(results_dir).is_file()]
    skipped = len(cells) - len(todo)
    if skipped:
        print(f"{skipped} of {len(cells)} cells already cached in {results_dir}: skipped")
    if not todo:
        return []
    check_data(settings.data_dir)
    data = DataCache(settings)
    done = load_cache(results_dir)
    new: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="reproduce", unit="cell", dynamic_ncols=True, smoothing=0)
    pending = list(todo)
    while pending:
        deferred: list[Cell] = []
        progressed = False
        for cell in pending:
            if cell.path(results_dir).is_file():
                bar.update(1)  # finished by another process meanwhile
                progressed = True
                continue
            lock = GroupLock(settings.work_dir, cell.group)
            if not lock.acquire():
                deferred.append(cell)
                continue
            try:
                if cell.path(results_dir).is_file():
                    bar.update(1)
                    progressed = True
                    continue
                rest = [c for c in pending if not c.path(results_dir).is_file()]
                eta = sum(estimate_seconds(c, done) for c in rest)
                bar.set_postfix_str(f"{cell.table}/{cell.cell_id}, ETA ~{_hms(eta)}")
                record = _alias(cell, results_dir)
                if record is None:
                    record = run_cell(cell, settings, data)
                write_cell(cell.path(results_dir), record)
            finally:
                lock.release()
            progressed = True
            done.append(record)
            new.append(record)
            bar.update(1)
            tqdm.write(_cell_line(cell, record))
            if on_cell is not None:
                on_cell(cell, record)
        if deferred and not progressed:
            names = sorted({c.group for c in deferred})
            tqdm.write(f"{len(deferred)} cell(s) left to the other process(es) holding {names}")
            break
        pending = deferred
    bar.close()
    return new


def _cell_line(cell: Cell, record: dict[str, Any]) -> str:
    wauc = record.get("wauc")
    shown = "n/a" if wauc is None else f"{100 * wauc:.2f}"
    how = f"same run as {record['same_run_as']}" if record.get("same_run_as") else (
        f"{record['seconds']:.0f} s"
        + (f", shared {','.join(record['shared_phases'])}" if record.get("shared_phases") else "")
    )  # fmt: skip
    return f"[{time.strftime('%H:%M:%S')}] {cell.table}/{cell.cell_id}: WAUC {shown} ({how})"
