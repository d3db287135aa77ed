"""The online scoring service: FastAPI app, snapshots with adapter hot-loading, registries,
online features and the torch / ONNX Runtime scorers. Start it with ``mdlora serve``."""
