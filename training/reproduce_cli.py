"""The ``mdlora reproduce`` command (wired into the CLI by :func:`register_reproduce`)."""

from __future__ import annotations

from pathlib import Path

import typer


def register_reproduce(app: typer.Typer) -> None:
    """Add the ``reproduce`` command to ``app``."""

    @app.command("reproduce")
    def reproduce_cmd(
        table: list[str] | None = typer.Option(
            None, "--table",
            help="table1, figure2, multilora, add_domain (repeat or comma-separate; default all).",
        ),
        split: list[str] | None = typer.Option(
            None, "--split", help="gender, age, occupation, age-groups (MultiLoRA's setting)."
        ),
        backbone: list[str] | None = typer.Option(
            None, "--backbone", help="wdl, nfm, autoint, pnn, dcn, fibinet, deepfm, xdeepfm, mlp."
        ),
        method: list[str] | None = typer.Option(
            None, "--method",
            help="base, mlora, moe, single, finetune, singlelora, multilora, multilora-add, "
            "multilora-avg.",
        ),
        seed: list[int] | None = typer.Option(None, "--seed", help="Seeds (default 1 2 3)."),
        data_dir: Path | None = typer.Option(
            None, "--data-dir",
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
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
        report_only: bool = typer.Option(
            False, "--report-only",
            help="Only rebuild docs/results.md and the plots from the cache.",
        ),
        verbose: bool = typer.Option(False, "--verbose", help="Show every phase's epochs."),

    ) -> None:
        """Reproduce the papers' MovieLens tables, cell by cell (cached, resumable).

        Writes results/reproduce/<table>/<cell>.json per finished cell and rebuilds
        docs/results.md with its plots after each one.
        """
        from training.reproduce import (
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
        try:
            new, report = reproduce(
                settings, table, split, backbone, method, seed, report_only=report_only
            )
        except ReproduceError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        if not report_only:
            typer.echo(f"{len(new)} cell(s) run this time")
        typer.echo(f"report: {report}")


def main() -> None:
    """``python -m training.reproduce_cli [options]``: the command without the full CLI."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register_reproduce(app)
    app()


if __name__ == "__main__":
    main()
