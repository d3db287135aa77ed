"""``python -m mdlora.cli <command>``: the ``mdlora`` command, where its script is not on the
PATH (``torchrun ... -m mdlora.cli train --config ...`` runs one training per process)."""

from mdlora.cli import app

app()
