"""Offline training: data settings (``mdlora.training.data``), the methods' phases, evaluation,
export, and adding a domain to a trained model. Entry points: ``mdlora train|export|add-domain|
quickstart`` (``mdlora.cli.training``) and :func:`mdlora.training.run.run_training`."""
