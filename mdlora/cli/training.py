"""The training part of the ``mdlora`` CLI: ``train``, ``export``, ``add-domain``, ``quickstart``.

Heavy modules (torch, pandas, the data layer) are imported inside the commands, so
``mdlora --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


def _fraction(value: float) -> float:
    if not 0 < value < 1:
        raise typer.BadParameter(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def _gate_scope(value: str) -> str:
    if value not in ("own", "all"):
        raise typer.BadParameter(f"must be 'own' or 'all', got {value!r}")
    return value


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _interrupted(out: Path, config: Path, overrides: list[str]) -> str:
    """The one line ``mdlora train`` prints on Ctrl-C: what the run folder kept, and the
    command that continues from its checkpoints (the same config, overrides and folder)."""
    import shlex

    done = sorted((out / "checkpoints").glob("*.safetensors"))
    if not done:
        return f"interrupted before any phase finished: nothing to resume in {out}"
    keep = [o for o in overrides if o.partition("=")[0].strip() not in ("out", "resume")]
    cmd = ["mdlora", "train", "--config", str(config), *keep, "--out", str(out), "--resume"]
    return (f"interrupted: {len(done)} finished phase(s) are checkpointed in {out}; "
            f"continue with: {shlex.join(cmd)}")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the training commands to ``app``."""

    @app.command("train")
    def train(
        config: Path = typer.Option(..., "--config", "-c", help="YAML experiment config."),
        overrides: list[str] | None = typer.Argument(
            None, help="key=value overrides, e.g. method=moe backbone=dcn epochs=2."
        ),
        out: Path | None = typer.Option(None, "--out", help="Run folder (default runs/<name>)."),
        amp: bool | None = typer.Option(
            None, "--amp/--no-amp", help="Mixed precision (float16 on CUDA)."
        ),
        device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
        resume: bool = typer.Option(False, "--resume", help="Reuse finished phases' checkpoints."),
    ) -> None:
        """Train a config's method (all its phases), evaluate it and export the artifact.

        Under ``torchrun --nproc_per_node N`` the phases run data-parallel (DDP).
        """
        from mdlora.training.config import ConfigError, load_config
        from mdlora.training.data.prepared import DataError
        from mdlora.training.distributed import init_from_env, shutdown
        from mdlora.training.run import run_training

        extra = list(overrides or [])
        if out is not None:
            extra.append(f"out={out}")
        if amp is not None:
            extra.append(f"amp={str(amp).lower()}")
        if device is not None:
            extra.append(f"device={device}")
        if resume:
            extra.append("resume=true")
        try:
            cfg = load_config(config, extra)
        except ConfigError as exc:
            raise _fail(str(exc)) from None
        try:
            ctx, dev = init_from_env(cfg.device)
        except (RuntimeError, ValueError) as exc:
            raise _fail(str(exc)) from None
        if not ctx.is_main:
            cfg.progress = False
        try:
            result = run_training(cfg, ctx, dev)
        except (ConfigError, DataError, FileNotFoundError) as exc:
            raise _fail(str(exc)) from None
        except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to go on, then exit 130
            if ctx.is_main:
                typer.secho(_interrupted(cfg.out_dir(), config, extra), err=True)
            raise typer.Exit(code=130) from None
        finally:
            shutdown(ctx)
        if ctx.is_main:
            wauc = result.test[result.primary].wauc
            shown = "n/a" if wauc is None else f"{100 * wauc:.2f}%"
            typer.echo(f"test WAUC {shown}; metrics in {result.out_dir / 'metrics.json'}")

    @app.command("export")
    def export(
        run: Path = typer.Option(..., "--run", help="Run folder written by `mdlora train`."),
        out: Path | None = typer.Option(
            None, "--out", help="Artifact folder (default <run>/artifact)."
        ),
        onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also write model.onnx."),
    ) -> None:
        """Write the artifact directory (and ONNX scorer) of a finished training run."""
        from mdlora.training.export import export_run

        try:
            paths = export_run(run, out, onnx)
        except FileNotFoundError as exc:
            raise _fail(str(exc)) from None
        for p in paths:
            typer.echo(f"artifact written: {p}")

    @app.command("add-domain")
    def add_domain_cmd(
        artifact: Path = typer.Option(..., "--artifact", help="Artifact folder to extend."),
        data: Path = typer.Option(..., "--data", help="Parquet/CSV rows of the new domain."),
        domain: str = typer.Option(..., "--domain", help="Name of the new domain."),
        division: str | None = typer.Option(None, help="Division (default: the primary one)."),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Adapter package folder (default <artifact>-adapters/<division>/<domain>/<v>).",
        ),
        epochs: int = typer.Option(10, min=1, help="Maximum epochs per phase."),
        lr: float | None = typer.Option(
            None, callback=_positive, help="Learning rate (default: the training run's)."
        ),
        batch_size: int | None = typer.Option(
            None,
            min=1,
            help="Batch size (default: the run's, smaller when the domain's rows would give an "
            "epoch fewer than 64 steps).",
        ),
        patience: int = typer.Option(3, min=1, help="Early-stopping patience (epochs)."),
        val_fraction: float = typer.Option(
            0.2,
            callback=_fraction,
            help="Share of the rows used for validation.",
        ),
        label: str | None = typer.Option(None, help="Label column (default: the run's)."),
        positive_label: list[str] | None = typer.Option(
            None,
            "--positive-label",
            help="A label value that means a click (repeatable; default: the run's schema).",
        ),
        version: int = typer.Option(1, min=1, help="Adapter version to write."),
        gate_scope: str = typer.Option(
            "own",
            callback=_gate_scope,
            help="MoE: the new gate row mixes its own experts (own) or all (all).",
        ),
        gate_lr: float = typer.Option(
            0.05, callback=_positive, help="MoE: learning rate of the new gate row."
        ),
        grow: bool = typer.Option(
            True,
            "--grow/--no-grow",
            help="Grow embedding rows for ids the export never saw (the domain's new users, "
            "items, ...) and train them with the adapter.",
        ),
        l2: float | None = typer.Option(
            None, min=0.0, help="L2 on the grown rows (default: the training run's)."
        ),
        eval_every: int | None = typer.Option(
            None,
            "--eval-every",
            min=1,
            help="Validate every N steps (default: once per epoch); early stopping and the "
            "restored weights follow it.",
        ),
        seed: int = typer.Option(2024, help="Random seed."),
        threads: int | None = typer.Option(
            None, min=1, help="torch CPU threads (default: all cores; fewer on a busy machine)."
        ),
        artifact_out: Path | None = typer.Option(
            None, "--artifact-out", help="Also write the whole grown model as a new artifact."
        ),
    ) -> None:
        """Train one new domain's adapter with everything else frozen; write its package."""
        import torch

        from mdlora.formats.files import (
            ArtifactError,
            error_text,
        )
        from mdlora.training.add_domain import AddDomainSettings, add_domain

        if threads is not None:
            if threads < 1:
                raise _fail(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)

        settings = AddDomainSettings(
            epochs=epochs, lr=lr, batch_size=batch_size, patience=patience,
            val_fraction=val_fraction, seed=seed, gate_scope=gate_scope, gate_lr=gate_lr,
            grow=grow, l2=l2, eval_every=eval_every,
        )  # fmt: skip
        try:
            res = add_domain(
                artifact, data, domain, division=division, out=out, settings=settings,
                label=label, version=version, artifact_out=artifact_out,
                positive_labels=positive_label or None,
            )  # fmt: skip
        except (ArtifactError, ValueError, FileNotFoundError, KeyError) as exc:
            raise _fail(error_text(exc)) from None
        typer.echo(res.describe())

    @app.command("quickstart")
    def quickstart_cmd(
        out: Path = typer.Option(Path("artifacts/quickstart"), "--out", help="Artifact folder."),
        serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the service after."),
        host: str = typer.Option("127.0.0.1", help="Service host."),
        port: int = typer.Option(8000, help="Service port."),
        onnx: bool = typer.Option(False, "--onnx/--no-onnx", help="Also export model.onnx."),
    ) -> None:
        """Synthetic data -> Base and MLoRA trained -> table -> artifact -> service, in a minute."""
        from mdlora.training.quickstart import quickstart

        quickstart(out, onnx=onnx)
        if not serve:
            typer.echo(
                f"4/4 skipped serving (--no-serve); start it with: mdlora serve --artifact {out}"
            )
            return
        typer.echo(f"4/4 serving {out} on http://{host}:{port} (Ctrl-C to stop)")
        from mdlora.cli.service import serve_artifact

        serve_artifact(out, host, port)
