"""``python -m training <command>``: the training commands without the service's dependencies.

The same commands as ``mdlora train|export|add-domain|quickstart``.
"""

from __future__ import annotations

import typer

import mdlora  # noqa: F401  (its OpenMP spin default, before torch loads)
from training.commands import register

app = typer.Typer(
    name="training",
    help="mdlora training commands: train, export, add-domain, quickstart.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """mdlora training commands."""


register(app)

if __name__ == "__main__":
    app()
