"""The ``mdlora reproduce`` command (wired into the CLI by :func:`register_reproduce`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer


def _worker_argv(
    table: list[str] | None,
    split: list[str] | None,
    backbone: list[str] | None,
    method: list[str] | None,
    seed: list[int] | None,
    settings: Any,
    max_rows: int | None,
    sample_frac: float | None,
    epochs: int | None,
    verbose: bool,
) -> list[str]:
    """The command line of one more worker on the same grid (``--workers 1``)."""
    argv = [sys.executable, "-m", "mdlora.cli.reproduce", "--workers", "1"]
    for flag, values in (("--table", table), ("--split", split), ("--backbone", backbone),
                         ("--method", method), ("--seed", seed)):  # fmt: skip
        for v in values or []:
            argv += [flag, str(v)]
    argv += ["--data-dir", str(settings.data_dir), "--results-dir", str(settings.results_dir),
             "--work-dir", str(settings.work_dir), "--docs-dir", str(settings.docs_dir),
             "--device", settings.device]  # fmt: skip
    for flag, value in (("--max-rows", max_rows), ("--sample-frac", sample_frac),
                        ("--epochs", epochs), ("--threads", settings.threads)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    if verbose:
        argv.append("--verbose")
    return argv


def register_reproduce(app: typer.Typer) -> None:
    """Add the ``reproduce`` command to ``app``."""

    @app.command("reproduce")
    def reproduce_cmd(
        table: list[str] | None = typer.Option(
            None,
            "--table",
            help="table1, figure2, multilora, add_domain (repeat or comma-separate; default all).",
        ),
        split: list[str] | None = typer.Option(
            None, "--split", help="gender, age, occupation, age-groups (MultiLoRA's setting)."
        ),
        backbone: list[str] | None = typer.Option(
            None, "--backbone", help="wdl, nfm, autoint, pnn, dcn, fibinet, deepfm, xdeepfm, mlp."
        ),
        method: list[str] | None = typer.Option(
            None,
            "--method",
            help="base, mlora, moe, single, finetune, singlelora, multilora, multilora-add, "
            "multilora-avg.",
        ),
        seed: list[int] | None = typer.Option(None, "--seed", help="Seeds (default 1 2 3)."),
        data_dir: Path | None = typer.Option(
            None,
            "--data-dir",
            help="Folder holding ml-1m/ (default $MDLORA_DATA_DIR, else ../shared/data).",
        ),
        results_dir: Path | None = typer.Option(
            None, "--results-dir", help="Cell cache (default results/reproduce)."
        ),
        work_dir: Path | None = typer.Option(
            None, "--work-dir", help="Run folders and shared checkpoints (default runs/reproduce)."
        ),
        docs_dir: Path | None = typer.Option(
            None, "--docs-dir", help="Where results.md and the plots go (default docs/)."
        ),
        max_rows: int | None = typer.Option(None, "--max-rows", help="Use the first N ratings."),
        sample_frac: float | None = typer.Option(
            None, "--sample-frac", help="Use a random fraction of the ratings."
        ),
        epochs: int | None = typer.Option(
            None, "--epochs", help="Maximum epochs per phase (default 10 with early stopping)."
        ),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda."),
        threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        report_only: bool = typer.Option(
            False,
            "--report-only",
            help="Only rebuild docs/results.md and the plots from the cache.",
        ),
        verbose: bool = typer.Option(False, "--verbose", help="Show every phase's epochs."),
        workers: int = typer.Option(
            1,
            "--workers",
            help="Processes working through the grid side by side (default 1). Each takes "
            "cells whose group no other holds; extra workers log to <work-dir>/worker-<i>.log.",
        ),
    ) -> None:
        """Reproduce the papers' MovieLens tables, cell by cell (cached, resumable).

        Writes results/reproduce/<table>/<cell>.json per finished cell and rebuilds
        docs/results.md with its plots after each one.
        """
        from mdlora.training.reproduce import (
            DEFAULT_DOCS,
            DEFAULT_RESULTS,
            DEFAULT_WORK,
            ReproduceError,
            Settings,
            Slice,
            default_data_dir,
            reproduce,
        )

        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            typer.secho("error: --device must be auto, cpu or cuda", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2)
        if sample_frac is not None and not 0 < sample_frac <= 1:
            typer.secho("error: --sample-frac must be in (0, 1]", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2)
        settings = Settings(
            data_dir=data_dir or default_data_dir(),
            results_dir=results_dir or DEFAULT_RESULTS,
            work_dir=work_dir or DEFAULT_WORK,
            docs_dir=docs_dir or DEFAULT_DOCS,
            device=device, threads=threads, verbose=verbose,
            data_slice=Slice(max_rows, sample_frac, epochs),
        )  # fmt: skip
        if workers < 1:
            typer.secho("error: --workers must be >= 1", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2)
        children: list[tuple[subprocess.Popen[bytes], Path]] = []
        if workers > 1 and not report_only:
            if threads is None:  # one core's worth each, not every worker on every core
                settings.threads = threads = max(1, (os.cpu_count() or 1) // workers)
            argv = _worker_argv(table, split, backbone, method, seed, settings, max_rows,
                                sample_frac, epochs, verbose)  # fmt: skip
            Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
            for i in range(2, workers + 1):
                log = Path(settings.work_dir) / f"worker-{i}.log"
                with log.open("wb") as fh:
                    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
                children.append((proc, log))
                typer.echo(f"worker {i} started (pid {proc.pid}), log: {log}")
        try:
            new, report = reproduce(
                settings, table, split, backbone, method, seed, report_only=report_only
            )
        except ReproduceError as exc:
            for proc, _ in children:
                proc.terminate()
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        failed = []
        for proc, log in children:
            if proc.wait() != 0:
                failed.append(str(log))
        if children:  # the others may have finished cells after this one's last report
            from mdlora.training.reproduce import write_report

            report = write_report(settings)
        if not report_only:
            typer.echo(f"{len(new)} cell(s) run this time by this process")
        typer.echo(f"report: {report}")
        if failed:
            typer.secho(f"error: worker(s) failed, see {failed}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1)


def main() -> None:
    """``python -m mdlora.cli.reproduce [options]``: the command without the full CLI."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register_reproduce(app)
    app()


if __name__ == "__main__":
    main()
