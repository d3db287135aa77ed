"""Running one cell: its config, phase sharing within a group, training, and the add-domain cell."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mdlora.training.config import TrainConfig
    from mdlora.training.data.prepared import PreparedData
    from mdlora.training.run import RunResult


from mdlora.training.reproduce.data import DataCache, _slice_options
from mdlora.training.reproduce.grid import (
    ADAPTER_PREFIXES,
    HOLDOUT_NAME,
    MULTILORA_PREFIX,
    Cell,
    Settings,
    train_method_of,
)


# ------------------------------------------------------------------------ cell runner
def train_config(cell: Cell, settings: Settings, out: Path) -> TrainConfig:
    """The :class:`TrainConfig` of one cell (the experiment as ``mdlora train`` would run it)."""
    from mdlora.training.config import DataConfig, TrainConfig

    sl = cell.slice
    data = DataConfig(source="preset", preset=cell.preset, path=str(settings.ml1m),
                      options=_slice_options(sl))  # fmt: skip
    return TrainConfig(
        name=f"{cell.table}-{cell.cell_id}", data=data, method=cell.train_method,
        model={"backbone": cell.backbone, "experts_per_domain": cell.experts,
               "fusion": cell.fusion},
        epochs=sl.epochs or 10, seed=cell.seed, device=settings.device,
        threads=settings.threads, progress=settings.verbose, out=str(out),
        export=cell.table == "add_domain", onnx=False, resume=True,
    )  # fmt: skip


def _checkpoint_paths(run_dir: Path, fingerprint: str, index: int, phase: str) -> tuple[Path, Path]:
    from mdlora.training.checkpoints import Checkpoints

    return Checkpoints(run_dir / "checkpoints", fingerprint, True, True).paths(
        "model", index, phase
    )


def _phase_names(method: str, cfg_divisions: Sequence[str]) -> list[str]:
    if method in MULTILORA_PREFIX:
        nat, aux = cfg_divisions[0], cfg_divisions[1]
        return ["backbone", f"lora:{nat}", f"lora:{aux}"][: MULTILORA_PREFIX[method]]
    return ["backbone"]


def _per_domain(method: str) -> bool:
    """Whether grid method ``method`` trains a model per domain (its recipe's trainer), so its
    phase 1 is no mixed-data backbone to share."""
    from mdlora.training.config import RECIPES

    return RECIPES[train_method_of(method)].trainer == "per_domain"


def shareable_phases(target: str, donor: str) -> int:
    """Leading phases ``target`` can take from a finished ``donor`` run of the same group."""
    if _per_domain(target) or _per_domain(donor):
        return 0  # Single trains one model per domain, from scratch
    if target in MULTILORA_PREFIX and donor in MULTILORA_PREFIX:
        return min(MULTILORA_PREFIX[target], MULTILORA_PREFIX[donor])
    return 1


def seed_shared_phases(
    cfg: TrainConfig, prepared: PreparedData, method: str, run_dir: Path, group_dir: Path
) -> list[str]:
    """Write the checkpoints of ``cfg``'s leading phases from a donor run in ``group_dir``.

    The donor is the finished run of the same group sharing the most phases. Phase 1 alone
    (different model shapes) copies the backbone tensors into a freshly built model seeded as
    :func:`run_training` seeds it, so the adapters keep their own initial values; longer
    prefixes (the MultiLoRA family, same shapes) copy every tensor. Returns the phases seeded.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from mdlora.training.checkpoints import state_dict_cpu
    from mdlora.training.run import build_model, resolve_hparams

    best: tuple[int, Path, str] | None = None
    for donor_dir in sorted(group_dir.glob("*/")):
        if donor_dir.resolve() == run_dir.resolve():
            continue
        info_file = donor_dir / "reproduce-run.json"
        if not info_file.is_file():
            continue
        donor = json.loads(info_file.read_text())
        n = shareable_phases(method, donor["method"])
        if n and (best is None or n > best[0]):
            best = (n, donor_dir, donor["fingerprint"])
    if best is None:
        return []
    n, donor_dir, donor_fp = best
    phases = _phase_names(method, prepared.divisions)[:n]
    torch.manual_seed(cfg.seed)
    fresh = state_dict_cpu(build_model(cfg, prepared, resolve_hparams(cfg, prepared)))
    target_fp = cfg.fingerprint()
    seeded = []
    for i, phase in enumerate(phases):
        src_w, src_m = _checkpoint_paths(donor_dir, donor_fp, i, phase)
        dst_w, dst_m = _checkpoint_paths(run_dir, target_fp, i, phase)
        if not (src_w.is_file() and src_m.is_file()):
            break
        donor_state = load_file(str(src_w))
        state = dict(fresh)
        if i == 0 and n == 1:
            keys = [k for k in fresh if not k.startswith(ADAPTER_PREFIXES)]
        else:
            keys = list(fresh)
            if set(donor_state) != set(fresh):
                break
        if any(k not in donor_state or donor_state[k].shape != fresh[k].shape for k in keys):
            break
        state.update({k: donor_state[k] for k in keys})
        meta = json.loads(src_m.read_text())
        dst_w.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(dst_w))
        dst_m.write_text(json.dumps({"fingerprint": target_fp, "result": meta["result"],
                                     "shared_from": str(donor_dir.name)}, indent=2))  # fmt: skip
        seeded.append(phase)
    return seeded


def _metrics(split: Any) -> dict[str, Any]:
    d: dict[str, Any] = split.to_dict()
    return d


def _param_counts(result: RunResult) -> dict[str, int]:
    from mdlora.models.freeze import phase_parameter_counts

    models = result.trained.models()
    return phase_parameter_counts(models[0]) if models else {}


def _device_name(settings: Settings) -> str:
    import torch

    from mdlora.training.distributed import pick_device

    dev = pick_device(settings.device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {platform.node()})"


def run_method(
    cell: Cell, settings: Settings, prepared: PreparedData
) -> tuple[RunResult, dict[str, Any]]:
    """Train ``cell``'s method through :func:`run_training`, sharing phases within its group."""
    from mdlora.training.run import run_training

    group_dir = Path(settings.work_dir) / cell.group
    run_dir = group_dir / cell.run_tag
    cfg = train_config(cell, settings, run_dir)
    info_file = run_dir / "reproduce-run.json"
    if info_file.is_file():
        info_file.unlink()  # an unfinished earlier attempt must not donate phases
    if (run_dir / "checkpoints").is_dir():
        import shutil

        shutil.rmtree(run_dir / "checkpoints")  # stale phases of another config or attempt
    seeded = seed_shared_phases(cfg, prepared, cell.method, run_dir, group_dir)
    result = run_training(cfg, prepared=prepared)
    info = {"method": cell.method, "fingerprint": cfg.fingerprint(), "cell": cell.cell_id}
    info_file.write_text(json.dumps(info))
    return result, {"shared_phases": seeded}


def run_cell(cell: Cell, settings: Settings, data: DataCache) -> dict[str, Any]:
    """Run one cell and return its JSON record (not yet written)."""
    import torch

    t0 = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    record: dict[str, Any] = {
        "table": cell.table, "cell": cell.cell_id, "split": cell.split,
        "backbone": cell.backbone, "method": cell.method, "label": cell.label,
        "seed": cell.seed, "experts_per_domain": cell.experts, "slice": cell.slice.to_dict(),
        "preset": cell.preset,
    }  # fmt: skip
    record.update(_train_cell(cell, settings, data))
    record["seconds"] = time.perf_counter() - t0
    record["trained_seconds"] = sum(
        p["seconds"] for p in record.get("phases", [])
        if p["name"] not in record.get("shared_phases", [])
    )  # fmt: skip
    record["device"] = _device_name(settings)
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


def _train_cell(cell: Cell, settings: Settings, data: DataCache) -> dict[str, Any]:
    record: dict[str, Any] = {}
    if cell.table == "add_domain":
        record.update(_run_add_domain(cell, settings, data))
    else:
        prepared = data.prepared(cell.preset, cell.slice)
        result, extra = run_method(cell, settings, prepared)
        record.update(extra)
        record["test"] = {k: _metrics(v) for k, v in result.test.items()}
        record["val_wauc"] = result.val[result.primary].wauc
        record["wauc"] = result.test[result.primary].wauc
        if result.reference is not None:
            record["reference"] = {
                "label": result.reference_label,
                "test": {k: _metrics(v) for k, v in result.reference.items()},
            }
        record["phases"] = [p.to_dict() for p in result.phases]
        record["param_counts"] = _param_counts(result)
        record["hparams"] = result.hparams.to_dict()
        record["rows"] = {s: len(prepared.split(s)["labels"]) for s in ("train", "val", "test")}
    return record


def _run_add_domain(cell: Cell, settings: Settings, data: DataCache) -> dict[str, Any]:
    """Train MLoRA without the held-out occupation, then add it as ``mdlora add-domain`` does."""
    import numpy as np

    from mdlora.formats.artifact import load_artifact
    from mdlora.formats.encoder import FeatureEncoder
    from mdlora.formats.grown import place
    from mdlora.training.add_domain import AddDomainSettings, add_domain
    from mdlora.training.evaluate import compute_metrics
    from mdlora.training.loop import predict, to_batch

    hold = data.holdout(cell.slice)
    prepared = hold.prepared
    result, extra = run_method(cell, settings, prepared)
    run_dir = Path(settings.work_dir) / cell.group / cell.run_tag
    artifact = run_dir / "artifact"
    new_rows = run_dir / f"domain-{hold.domain}.parquet"
    hold.fit_rows.to_parquet(new_rows, index=False)
    grown = run_dir / "artifact-grown"
    t0 = time.perf_counter()
    add = add_domain(
        artifact, new_rows, hold.domain, division="occupation", out=run_dir / "adapter",
        settings=AddDomainSettings(
            epochs=cell.slice.epochs or 10, seed=cell.seed, device=settings.device,
            progress=settings.verbose,
        ),
        label="label", artifact_out=grown,
    )  # fmt: skip
    add_seconds = time.perf_counter() - t0
    art = load_artifact(grown, map_location="cpu")
    from mdlora.training.distributed import pick_device

    model = art.model.to(pick_device(settings.device))
    assert art.encoder is not None
    encoder = FeatureEncoder.from_dict(art.encoder)
    place(encoder, model)  # the held-out occupation's users are new: their grown rows
    arrays = encoder.transform(hold.test_rows)
    labels = hold.test_rows["label"].to_numpy(np.float32)
    batch = to_batch({**arrays, "labels": labels}, model.device)
    ones = np.zeros(len(labels), dtype=np.int64)
    scores = {}
    final = model.stage
    for stage in ("backbone", "adapters"):
        model.set_stage(stage)
        probs = predict(model, batch)
        scores[stage] = compute_metrics(labels, probs, ones, [hold.domain]).domains[0]
    model.set_stage(final.name)
    # the other domains are untouched by the addition: their test metrics before and after
    others = to_batch(prepared.test, model.device)
    after = compute_metrics(
        prepared.test["labels"], predict(model, others), prepared.test["domains"][:, 0],
        prepared.domain_names["occupation"], "occupation",
    )  # fmt: skip
    before = result.test["occupation"]
    return {
        **extra,
        "held_out": {
            "domain": hold.domain,
            "name": HOLDOUT_NAME,
            "fit_rows": len(hold.fit_rows),
            "test_rows": len(hold.test_rows),
            "test_positives": int(labels.sum()),
        },
        "test_new_domain": {
            "backbone": scores["backbone"].__dict__,
            "added": scores["adapters"].__dict__,
        },
        "add_domain": {
            "rows_train": add.rows_train,
            "rows_val": add.rows_val,
            "grown": add.grown,
            "val_auc_backbone": add.val_auc_backbone,
            "val_auc": add.val_auc,
            "phases": [p.to_dict() for p in add.phases],
            "seconds": add_seconds,
        },
        "others_wauc_before": before.wauc,
        "others_wauc_after": after.wauc,
        "others_unchanged": bool(
            all(a.auc == b.auc for a, b in zip(after.domains, before.domains, strict=True))
        ),
        "test": {"occupation": _metrics(result.test["occupation"])},
        "wauc": result.test["occupation"].wauc,
        "phases": [p.to_dict() for p in result.phases],
        "rows": {s: len(prepared.split(s)["labels"]) for s in ("train", "val", "test")},
        "hparams": result.hparams.to_dict(),
    }
