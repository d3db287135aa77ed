"""Offline training: data settings (``training.data``), the methods' phases, evaluation, export,
and adding a domain to a trained model. Entry points: ``mdlora train|export|add-domain|
quickstart`` (``mdlora.cli.training``) and :func:`training.methods.run_training`."""
