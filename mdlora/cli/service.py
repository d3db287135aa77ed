"""The service's CLI commands: ``mdlora serve`` and ``mdlora publish-features``.

Heavy modules (torch, the app) are imported inside the commands so ``mdlora --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import typer


def serve_artifact(artifact_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``artifact_dir`` with uvicorn (settings from ``MDLORA_*``, artifact given here)."""
    import logging

    import uvicorn

    from mdlora.service.app import create_app
    from mdlora.service.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    settings = load_settings(artifact_dir=artifact_dir)
    uvicorn.run(
        create_app(settings, serving_process=True),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        # longer than the idle timeout of common load balancers (60 s), so they never reuse
        # a connection the server has just closed
        timeout_keep_alive=75,
        timeout_graceful_shutdown=10,
    )


def _read_data(path: Path, columns: list[str]) -> Any:
    """A table (Parquet/CSV), a Taobao-layout folder (clicks with the user / item vectors), or
    a MovieLens-1M/100K folder (with the presets' derived columns)."""
    from mdlora.training.data.tabular import read_table

    if path.is_dir() and any((path / f"clicks{s}").is_file() for s in (".parquet", ".csv")):
        from mdlora.training.data.taobao import taobao_feature_frame

        return taobao_feature_frame(path)
    if path.is_dir():
        from mdlora.training.data.presets import load_movielens

        frame = load_movielens(path)
        if "age_group" in columns and "age_group" not in frame.columns:
            from mdlora.training.data.presets import MULTILORA_AGE_GROUPS

            groups = {c: g for g, codes in MULTILORA_AGE_GROUPS.items() for c in codes}
            frame["age_group"] = frame["age"].map(groups)
        return frame
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give a Parquet/CSV file or a MovieLens folder")
    if path.suffix.lower() == ".tsv":
        import pandas as pd

        return pd.read_csv(path, sep="\t", low_memory=False)
    return read_table(path)


def _exit(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``publish-features`` and ``rollout`` to the ``mdlora`` app."""
    from mdlora.cli.rollout import rollout_app

    app.add_typer(rollout_app, name="rollout")

    @app.command("serve")
    def serve(
        artifact: Path | None = typer.Option(
            None, "--artifact", help="artifact directory (default: $MDLORA_ARTIFACT_DIR)"
        ),
        host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 in containers)"),
        port: int = typer.Option(8000, min=0, max=65535, help="port to listen on"),
    ) -> None:
        """Serve an artifact over HTTP (POST /predict, /v1 admin, /metrics, /docs)."""
        directory = artifact or os.environ.get("MDLORA_ARTIFACT_DIR")
        if not directory:
            raise typer.BadParameter("give --artifact DIR or set MDLORA_ARTIFACT_DIR")
        from mdlora.formats.artifact import check_artifact
        from mdlora.formats.files import MANIFEST, ArtifactError

        if not (Path(directory) / MANIFEST).is_file():
            raise typer.BadParameter(f"{directory} is not an artifact (no {MANIFEST})")
        try:
            check_artifact(directory)  # a broken artifact: one line, not a startup traceback
        except ArtifactError as exc:
            _exit(str(exc))
        try:
            serve_artifact(Path(directory), host, port)
        except ValueError as exc:  # settings, or an artifact the service cannot use
            _exit(str(exc))

    @app.command("publish-features")
    def publish(
        artifact: Path = typer.Option(..., "--artifact", help="artifact directory (its encoder)"),
        data: Path = typer.Option(
            ..., "--data", help="Parquet/CSV table, Taobao-layout or MovieLens folder"
        ),
        redis_url: str | None = typer.Option(
            None, "--redis-url", help="default: $MDLORA_REDIS_URL or redis://127.0.0.1:6379/0"
        ),
        prefix: str | None = typer.Option(
            None, "--prefix", help="key prefix (default: $MDLORA_REDIS_PREFIX or 'mdlora')"
        ),
        user_field: str | None = typer.Option(None, "--user-field", help="user-id column"),
        item_field: str | None = typer.Option(None, "--item-field", help="item-id column"),
    ) -> None:
        """Write user and item features of a dataset to the Redis feature store."""
        import redis
        from rich.console import Console

        from mdlora.formats.artifact import read_manifest
        from mdlora.formats.encoder import FeatureEncoder
        from mdlora.formats.files import (
            ArtifactError,
            error_text,
        )
        from mdlora.service.feature_store import detect_id_fields, publish_features

        console = Console()
        url = redis_url or os.environ.get("MDLORA_REDIS_URL", "redis://127.0.0.1:6379/0")
        key_prefix = prefix or os.environ.get("MDLORA_REDIS_PREFIX", "mdlora")
        try:
            manifest = read_manifest(artifact)
            if not manifest.get("encoder"):
                raise ArtifactError(f"{artifact} has no encoder.json")
            encoder = FeatureEncoder.load(artifact / manifest["encoder"])
            user_col, item_col = detect_id_fields(encoder, manifest, user_field, item_field)
            if user_col is None or item_col is None:
                raise ArtifactError(
                    "cannot tell the user / item id columns: pass --user-field and --item-field"
                )
            frame = _read_data(data, encoder.columns)
            for col in (user_col, item_col):
                if col not in frame.columns:
                    raise ArtifactError(
                        f"{data} has no {col!r} column (the id column the model reads); "
                        f"its columns: {list(frame.columns)[:20]} (see --user-field/--item-field)"
                    )
        except (ArtifactError, ValueError, KeyError, OSError) as exc:  # DataError: ValueError
            _exit(error_text(exc))
        try:
            client = redis.Redis.from_url(url, decode_responses=True)
            client.ping()
            result = publish_features(frame, encoder, user_col, item_col, client, key_prefix)
        except (redis.RedisError, ConnectionError, TimeoutError) as exc:
            _exit(f"cannot reach or write Redis at {url}: {exc}")
        except ValueError as exc:  # from_url: not a redis:// / rediss:// / unix:// URL
            _exit(f"--redis-url {url}: {exc}")
        console.print(
            f"published {result['users']} users ({', '.join(result['user_columns']) or '-'}) "
            f"and {result['items']} items ({', '.join(result['item_columns']) or '-'}) "
            f"to {url} under '{key_prefix}:feat:'"
        )
