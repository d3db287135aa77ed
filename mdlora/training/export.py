"""Export: a run's weights to the artifact directory the service loads (and an ONNX scorer).

``mdlora train`` keeps its final weights in ``<run>/final/`` (plain safetensors + JSON) and,
unless ``export: false``, writes ``<run>/artifact`` at the end. ``mdlora export --run <run>``
writes the artifact again, anywhere. The artifact is ``mdlora.formats.artifact.save_artifact``'s
format with the fitted encoder and the run's metrics; next to it, ``model.onnx`` is the
scorer with adapter banks as graph inputs, from ``mdlora.formats.onnx_export`` (skipped with a
message when that module is absent or the export fails: the artifact is complete without it).

Single and Fine-tune train one model per domain: they export one artifact per domain,
``<out>/domain-<id>/``, listed in ``<out>/domains.json``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from mdlora.formats.artifact import (
    model_config_from_dict,
    save_artifact,
)
from mdlora.formats.fileio import share_tree
from mdlora.formats.files import (
    ENCODER,
    ONNX_MODEL,
)
from mdlora.models.model import MultiDomainModel

if TYPE_CHECKING:
    from mdlora.training.run import RunResult

ONNX_FILE = ONNX_MODEL
FINAL = "final"


def _model_meta(model: MultiDomainModel) -> dict[str, Any]:
    return {
        "config": model.config.to_dict(),
        "stage": {
            "name": model.stage.name,
            "expert": model.stage.expert,
            "division": model.stage.division,
        },
        "routing": list(model.routing),
    }


def save_final(result: RunResult) -> Path:
    """Write the trained weights, encoder and metrics to ``<run>/final/``."""
    from mdlora.training.checkpoints import state_dict_cpu
    from mdlora.training.run import label_column, positive_labels

    final = result.out_dir / FINAL
    if final.exists():
        shutil.rmtree(final)
    final.mkdir(parents=True)
    trained = result.trained
    entries = [(None, trained.model)] if trained.model is not None else \
        list(trained.per_domain.items())  # fmt: skip
    index = []
    for d, model in entries:
        assert model is not None
        stem = "model" if d is None else f"domain-{d}"
        save_file(state_dict_cpu(model), str(final / f"{stem}.safetensors"))
        (final / f"{stem}.json").write_text(json.dumps(_model_meta(model), indent=2))
        index.append({"domain_id": d, "stem": stem})
    (final / ENCODER).write_text(json.dumps(result.prepared.encoder.to_dict()))
    info = {
        "models": index,
        "metrics": result.metrics_dict(),
        "training": {
            "config": result.config.to_dict(),
            "label_column": label_column(result.config),
            "positive_labels": positive_labels(result.config),
            "data": result.prepared.name,
        },
    }
    (final / "run.json").write_text(json.dumps(info, indent=2))
    share_tree(final)  # safetensors' save_file creates owner-only files
    return final


def load_model(weights: Path, meta: Path, device: str | torch.device = "cpu") -> MultiDomainModel:
    """A model from ``final/`` files (safetensors weights, JSON config and stage)."""
    info = json.loads(meta.read_text())
    model = MultiDomainModel(model_config_from_dict(info["config"]))
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    stage = info["stage"]
    model.set_stage(stage["name"], expert=stage.get("expert"), division=stage.get("division"))
    model.set_routing(info.get("routing", "bag"))
    return model.to(device).eval()


def export_artifact(
    model: MultiDomainModel,
    directory: Path,
    encoder: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    onnx: bool = True,
) -> Path:
    """``save_artifact`` plus, when possible, ``model.onnx`` in the same folder."""
    model = model.eval()
    save_artifact(model, directory, encoder=encoder, metrics=metrics, extra=extra)
    if onnx:
        export_onnx_file(model, directory / ONNX_FILE)
    return directory


def export_onnx_file(model: MultiDomainModel, path: Path) -> Path | None:
    """Call ``mdlora.formats.onnx_export.export_onnx`` if it exists; report (not raise) a
    failure."""
    if importlib.util.find_spec("mdlora.formats.onnx_export") is None:
        print("ONNX export skipped: mdlora.formats.onnx_export is not installed in this checkout")
        return None
    from mdlora.formats.onnx_export import export_onnx

    was_device = model.device
    try:
        return export_onnx(model.cpu(), path)
    except Exception as exc:  # the artifact stays usable by the torch scorer
        print(
            f"ONNX export failed ({type(exc).__name__}: {exc}); the artifact is complete "
            "without model.onnx and the service can score with the torch runtime"
        )
        return None
    finally:
        model.to(was_device)


def _metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("method", "label", "backbone", "data", "seed", "wauc", "test", "hparams")
    return {k: metrics[k] for k in keep if k in metrics}


def export_final(final: Path, out: Path, onnx: bool = True) -> list[Path]:
    """Write the artifact(s) of a ``final/`` folder to ``out``."""
    if not (final / "run.json").is_file():
        raise FileNotFoundError(
            f"{final} has no run.json: point --run at a folder written by `mdlora train`"
        )
    info = json.loads((final / "run.json").read_text())
    encoder = json.loads((final / ENCODER).read_text())
    metrics = _metrics_summary(info["metrics"])
    extra = {"training": info["training"]}
    models = info["models"]
    if len(models) == 1 and models[0]["domain_id"] is None:
        model = load_model(final / "model.safetensors", final / "model.json")
        return [export_artifact(model, out, encoder, metrics, extra, onnx)]
    paths, listing = [], {}
    primary = info["metrics"]["test"]
    names = next(iter(primary.values()))["domains"]
    for entry in models:
        d, stem = int(entry["domain_id"]), entry["stem"]
        model = load_model(final / f"{stem}.safetensors", final / f"{stem}.json")
        sub = out / f"domain-{d}"
        paths.append(export_artifact(model, sub, encoder, metrics, {**extra, "domain_id": d},
                                     onnx))  # fmt: skip
        listing[str(d)] = {"domain": names[d]["domain"], "path": sub.name}
    (out / "domains.json").write_text(json.dumps(listing, indent=2))
    return paths


def export_result(result: RunResult) -> list[Path]:
    """The end of ``mdlora train``: artifact(s) at ``<run>/artifact``."""
    return export_final(result.out_dir / FINAL, result.out_dir / "artifact", result.config.onnx)


def export_run(run_dir: Path, out: Path | None = None, onnx: bool = True) -> list[Path]:
    """``mdlora export``: the artifact(s) of a finished run folder, at ``out``."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL if (run_dir / FINAL).is_dir() else run_dir
    return export_final(final, Path(out) if out else run_dir / "artifact", onnx)
