"""The ``mdlora`` command line: one typer app, filled in by the training and service parts."""

from __future__ import annotations

import typer

from service.commands import register as register_service
from training.amazon_cli import register_amazon
from training.commands import register as register_training
from training.reproduce_cli import register_reproduce

app = typer.Typer(
    name="mdlora",
    help="Multi-domain CTR prediction with low-rank adapters: train, export, add a domain, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_training(app)
register_service(app)
register_reproduce(app)
register_amazon(app)


if __name__ == "__main__":
    app()
