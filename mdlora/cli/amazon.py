"""The ``mdlora reproduce-amazon`` command: the real-data experiments of
``mdlora.training.amazon``."""

from __future__ import annotations

from pathlib import Path

import typer


def register_amazon(app: typer.Typer) -> None:
    """Add the ``reproduce-amazon`` command to ``app``."""

    @app.command("reproduce-amazon")
    def reproduce_amazon_cmd(
        data: Path | None = typer.Option(
            None, "--data", help="The Amazon 3-domain Parquet (default: ../shared/data/...)."
        ),
        seed: list[int] | None = typer.Option(None, "--seed", help="Seeds (default 1 2 3)."),
        backbone: str = typer.Option("deepfm", "--backbone", help="Backbone of every cell."),
        part: list[str] | None = typer.Option(
            None,
            "--part",
            help="new-domain and/or a recipe of training.amazon.RECIPES (mlora, mlora_fresh, "
            "finetune_fresh, mlora_joint, moe, multilora, ...); default: all",
        ),
        results_dir: Path = typer.Option(Path("results/amazon"), "--results-dir"),
        work_dir: Path = typer.Option(Path("runs/amazon"), "--work-dir"),
        docs: Path = typer.Option(Path("docs/results-amazon.md"), "--docs"),
        epochs: int = typer.Option(10, "--epochs", min=1, help="Maximum epochs per phase."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
        report_only: bool = typer.Option(False, "--report-only", help="Only rewrite the report."),
    ) -> None:
        """Amazon 2014 (sports, toys, office): a new category added later against a full
        retraining, and the adapter recipes on the existing ones. Resumable: finished cells
        are read back from --results-dir."""
        from mdlora.training.amazon import AMAZON, RECIPES, CellSettings, grid_cell, new_domain_cell
        from mdlora.training.amazon import report as amazon_report

        path = data or AMAZON
        if not report_only and not path.is_file():
            raise typer.BadParameter(f"{path} not found: pass --data", param_hint="--data")
        parts = part or ["new-domain", *RECIPES]
        bad = [p for p in parts if p != "new-domain" and p not in RECIPES]
        if bad:
            raise typer.BadParameter(
                f"unknown part(s) {bad}; choose from new-domain, {', '.join(RECIPES)}",
                param_hint="--part",
            )
        settings = CellSettings(
            backbone=backbone, epochs=epochs, device=device, threads=threads, progress=True
        )
        if not report_only:
            for s in seed or [1, 2, 3]:
                for p in parts:
                    if p == "new-domain":
                        new_domain_cell(path, work_dir, s, settings, results=results_dir)
                    else:
                        grid_cell(path, results_dir, work_dir, p, s, settings)
                    docs.parent.mkdir(parents=True, exist_ok=True)
                    docs.write_text(amazon_report(results_dir) + "\n")
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(amazon_report(results_dir) + "\n")
        typer.echo(f"report: {docs}")
