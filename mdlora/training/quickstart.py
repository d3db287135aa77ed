"""``mdlora quickstart``: the whole path on synthetic data in about a minute.

Generates a synthetic multi-domain data set whose domains differ in ways a shared model
cannot fit (``mdlora.training.data.synthetic``), trains MLoRA (phase 1 is the Base model: one
backbone on all domains; phase 2 adds the per-domain adapters), prints Base against MLoRA,
exports the artifact, and starts the service on it unless ``--no-serve``. The ONNX scorer is
left out unless ``--onnx`` (its export takes longer than the training here; the service
scores with torch by default, and ``mdlora export --run`` writes it later).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mdlora.formats.files import MANIFEST, REGISTRY
from mdlora.training.config import TrainConfig, config_from_dict
from mdlora.training.run import RunResult

#: the synthetic data and training knobs of the quickstart (small, seeded, fast on 2 cores)
QUICKSTART_DATA = {
    "n_rows": 40_000, "n_domains": 4, "seed": 4, "n_users": 300, "n_items": 150,
    "domain_strength": 2.0,
}  # fmt: skip
QUICKSTART_TRAINING = {
    "method": "mlora",
    "model": {"backbone": "deepfm", "tower": [64, 32], "dropout": 0.0, "alpha": 8},
    "lr": 0.005, "batch_size": 512, "epochs": 6, "patience": 2, "seed": 2024,
}  # fmt: skip


#: the new domain the README adds to the served quickstart model (users and items the
#: quickstart data never had: ids from 1,000,000 up)
NEW_DOMAIN = "d_new"


def write_new_domain(path: Path) -> Path:
    """The rows of :data:`NEW_DOMAIN` as a Parquet file (same columns as the training data)."""
    from mdlora.training.data.synthetic import make_new_domain

    path.parent.mkdir(parents=True, exist_ok=True)
    make_new_domain(NEW_DOMAIN, n_rows=12_000, n_users=300, n_items=150, seed=11).to_parquet(path)
    return path


def quickstart_config(run_dir: Path, **overrides: object) -> TrainConfig:
    raw = {
        "name": "quickstart",
        "data": {"source": "synthetic", "options": dict(QUICKSTART_DATA)},
        **QUICKSTART_TRAINING,
        "out": str(run_dir),
        "export": False,
        **overrides,
    }
    return config_from_dict(raw)


def quickstart(
    out: Path = Path("artifacts/quickstart"),
    *,
    run_dir: Path | None = None,
    onnx: bool = False,
) -> RunResult:
    """Generate, train, compare and export to ``out`` (steps 1-3; the ``mdlora quickstart``
    command then serves it); returns the run."""
    from mdlora.training.export import export_run
    from mdlora.training.run import run_training

    out = Path(out)
    run_dir = run_dir or out.parent / f"{out.name}-run"
    print("1/4 generating synthetic data: "
          f"{QUICKSTART_DATA['n_rows']} rows, {QUICKSTART_DATA['n_domains']} domains")  # fmt: skip
    cfg = quickstart_config(run_dir)
    print("2/4 training Base (phase 1: one backbone, all domains), then MLoRA (phase 2)")
    result = run_training(cfg)
    base = result.reference[result.primary].wauc if result.reference else None
    mlora = result.test[result.primary].wauc
    if base is not None and mlora is not None:
        verdict = "beats" if mlora > base else "does NOT beat"
        print(f"MLoRA {verdict} Base on test WAUC: {100 * mlora:.2f}% vs {100 * base:.2f}%")
    print(f"3/4 exporting the artifact to {out}")
    if (out / REGISTRY).exists() and (out / MANIFEST).is_file():  # an earlier quickstart's
        print(f"    replacing the previous quickstart artifact at {out} and the adapters "
              "registered on it")  # fmt: skip
        shutil.rmtree(out)
    for path in export_run(run_dir, out, onnx=onnx):
        print(f"    artifact written: {path}")
    from mdlora.training.data.synthetic import write_synthetic

    table = write_synthetic(run_dir / "data.parquet", **QUICKSTART_DATA)  # the same rows
    print(f"    the generated table: {table} (online features into Redis: "
          f"mdlora publish-features --artifact {out} --data {table})")  # fmt: skip
    new = write_new_domain(run_dir / "new_domain.parquet")
    print(f"    a NEW domain with its own users and items: {new} (add it without retraining: "
          f"mdlora add-domain --artifact {out} --data {new} --domain {NEW_DOMAIN})")  # fmt: skip
    return result
