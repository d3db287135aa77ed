"""The ``mdlora`` command line: one typer app, filled in by the training and service parts."""

from __future__ import annotations

import typer

from mdlora.cli.amazon import register_amazon
from mdlora.cli.reproduce import register_reproduce
from mdlora.cli.service import register as register_service
from mdlora.cli.training import register as register_training

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
