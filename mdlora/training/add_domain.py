"""Add a domain to a trained model: train only its adapter, write an adapter package.

``mdlora add-domain --artifact DIR --data FILE --domain NAME`` loads the artifact and its
encoder, reads the new domain's rows (the domain column equal to NAME, or every row when the
file has no domain column), adds the domain to the model (``model.add_domain``; the model's
divisions own the domain list and the encoder takes it from them, ``mdlora.formats.domains``),
grows embedding rows for the ids its training rows bring that the export never saw (new
users, new items, the domain's own value of a domain feature; scoped to the domain, see
``mdlora.formats.grown``), and trains the new domain's parameters, those rows
included, with everything else frozen:

* MLoRA: stage ``adapters``, group ``expert:<d>`` (the bank row of domain ``d``);
* MoE-MLoRA: for each new expert ``e`` (owned by ``d``), stage ``expert=e`` with group
  ``expert:<e>``; then stage ``gate`` with group ``gate_row:<d>``. By default the new gate row
  sees only the domain's own experts (``gate_scope="own"``, the paper's "initialised to that
  domain's own expert(s)"); with one expert per domain there is then nothing to train and the
  gate phase is skipped. ``gate_scope="all"`` lets it mix every expert (measured on synthetic
  data: the row, trained alone, does not recover what the own experts give);
* MultiLoRA: stage ``lora`` with ``lora:<div>:<d>`` and ``norms:div:<div>:<d>``, then (unless
  the model ends in a ``lora`` stage, SingleLoRA) stage ``fusion`` with the new norm cells.

Early stopping uses a validation split of the new rows. Every existing domain's scores stay
bit-identical (frozen rows are masked, frozen norms keep their statistics, a batch holds
only the new domain). The output is an adapter package (``adapter_config.json`` with the
grown values as ``grown_vocab`` + ``adapter_model.safetensors`` with their rows) the service
can register, with the grown encoder beside it as ``encoder.json``; nothing is written unless
training succeeded. A domain whose rows would all look alike to the model (its ids unknown
and no rows grown for them) is refused: no adapter could tell them apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mdlora.formats.adapter_package import (
    make_adapter_package,
    write_adapter_package,
)
from mdlora.formats.artifact import (
    adapter_dir,
    check_artifact_target,
    load_artifact,
    save_artifact,
)
from mdlora.formats.domains import model_domains
from mdlora.formats.encoder import FeatureEncoder, LabeledArrays, canonical_value
from mdlora.formats.files import (
    BACKBONE_WEIGHTS,
    ENCODER,
    GROWN_VOCAB,
    ArtifactError,
)
from mdlora.formats.grown import new_values, place, region_fields
from mdlora.models.model import MultiDomainModel
from mdlora.models.rows import grow_domain_rows
from mdlora.training.data.prepared import DataError, labels_from
from mdlora.training.data.splits import stratified_domain_split
from mdlora.training.distributed import pick_device
from mdlora.training.evaluate import compute_metrics
from mdlora.training.loop import LoopSettings, Phase, PhaseResult, predict, to_batch, train_phase


@dataclass
class AddDomainSettings:
    epochs: int = 10
    lr: float | None = None  # None: the training run's learning rate
    batch_size: int | None = None  # None: the run's, capped to give MIN_STEPS steps an epoch
    patience: int = 3
    val_fraction: float = 0.2
    seed: int = 2024
    gate_scope: str = "own"  # MoE-MLoRA: the new gate row sees only its own experts, or all
    gate_lr: float = 0.05  # MoE-MLoRA gate row: a few numbers, which need larger steps
    grow: bool = True  # grow embedding rows for ids the export never saw (new users, items)
    l2: float | None = None  # L2 on the grown rows; None: the training run's
    eval_every: int | None = None  # validate every N steps (None: once per epoch)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "patience": self.patience >= 1,
            "batch_size": self.batch_size is None or self.batch_size >= 1,
            "lr": self.lr is None or self.lr > 0,
            "gate_lr": self.gate_lr > 0,
            "val_fraction": 0 < self.val_fraction < 1,
            "gate_scope": self.gate_scope in ("own", "all"),
            "l2": self.l2 is None or self.l2 >= 0,
            "eval_every": self.eval_every is None or self.eval_every >= 1,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid add-domain settings: {', '.join(bad)} (epochs, patience and batch "
                "size >= 1; learning rates > 0; 0 < val_fraction < 1; gate_scope own or all)"
            )


#: a new domain's rows are few: the default batch gives an epoch at least this many steps
MIN_STEPS = 64


def default_batch_size(run_batch: int, train_rows: int) -> int:
    """The training run's batch size, smaller where the new domain's rows would give an epoch
    fewer than :data:`MIN_STEPS` steps (never below 32).

    Measured on ML-1M's held-out occupation 9 (7,300 training rows): at the run's batch of
    1,024 an epoch is 7 steps and the grown rows were still improving after 10 epochs (test
    AUC 78.41); at about 64 steps an epoch they converge within the epochs (79.20).
    """
    return max(1, min(run_batch, max(32, train_rows // MIN_STEPS)))


@dataclass
class AddDomainResult:
    division: str
    domain: str
    domain_id: int
    version: int
    package_dir: Path | None
    encoder: FeatureEncoder
    phases: list[PhaseResult]
    rows_train: int
    rows_val: int
    val_auc_backbone: float | None  # the new domain's validation AUC with the backbone alone
    val_auc: float | None  # ... with its trained adapter
    grown: dict[str, int] = field(default_factory=dict)  # column -> ids grown for the domain
    artifact_out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        """What a user should know before shipping this adapter."""
        out = []
        if self.val_auc_backbone is None:
            out.append(
                "the validation rows hold a single class, so AUC cannot be measured and early "
                "stopping had nothing to go on; give the domain rows with both labels"
            )
        elif self.phases and all(p.best_epoch == 0 for p in self.phases):
            out.append(
                "no epoch improved the validation AUC over the backbone alone, so the adapter "
                "kept its starting weights and scores exactly like the backbone (more rows, "
                "another --lr or more --epochs may help)"
            )
        return out

    def describe(self) -> str:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.2f}%"

        lines = [
            f"domain {self.domain!r} added to division {self.division!r} as id {self.domain_id}"
            f" ({self.rows_train} training rows, {self.rows_val} validation rows)",
            "embedding rows grown for ids the export never saw: "
            + (", ".join(f"{c} {n}" for c, n in self.grown.items()) or "none"),
            f"validation AUC over all the domain's validation rows: backbone alone "
            f"{pct(self.val_auc_backbone)}, with the new adapter {pct(self.val_auc)} (the "
            "phases' per-epoch 'val mean AUC' averages per-domain AUCs, so it can differ)",
        ]
        lines += [f"warning: {w}" for w in self.warnings()]
        if self.package_dir is not None:
            lines.append(f"adapter package (version {self.version}): {self.package_dir}")
        if self.artifact_out is not None:
            lines.append(f"grown artifact: {self.artifact_out}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ rows
def read_domain_rows(
    path: Path,
    encoder: FeatureEncoder,
    division: str,
    domain: str,
    label: str,
    positive: list[Any] | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """The new domain's rows of a Parquet/CSV file, and their 0/1 labels.

    ``positive``: label values that mean a click (the training schema's ``positive_labels``).
    """
    from mdlora.training.data.tabular import check_dense_column, read_table

    df = read_table(path)
    if division in df.columns:
        keys = df[division].map(canonical_value)
        rows = df[keys == domain]
        if rows.empty:
            seen = sorted({str(k) for k in keys.dropna().unique()})[:10]
            raise ValueError(
                f"{path}: no rows with {division} == {domain!r} (values present: {seen}); "
                "pass the matching --domain or drop the column to use every row"
            )
        df = rows.reset_index(drop=True)
    else:
        df = df.assign(**{division: domain})
    needed = [c for c in encoder.columns if c not in df.columns]
    if label not in df.columns:
        needed.append(label)
    if needed:
        raise ValueError(
            f"{path}: column(s) {needed} of the artifact's schema are missing "
            f"(the file needs {[*encoder.columns, label]}); use --label for another label name"
        )
    try:
        labels = labels_from(df[label], positive)
    except DataError as exc:
        raise DataError(f"{path}: label column {label!r}: {exc}") from None
    for col in encoder.dense_columns:
        check_dense_column(df[col], f"{path}: dense column {col!r}")
    return df, labels


def _split(n: int, labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 10:
        raise ValueError(f"only {n} rows for the new domain: at least 10 are needed")
    train, val, _ = stratified_domain_split(
        np.zeros(n, dtype=np.int64), labels, (1 - val_fraction, val_fraction, 0.0), seed
    )
    return train, val


def _take(arrays: dict[str, Any], labels: np.ndarray, idx: np.ndarray) -> LabeledArrays:
    mh = arrays["multi_hot"]
    return LabeledArrays(
        sparse=arrays["sparse"][idx], dense=arrays["dense"][idx],
        domains=arrays["domains"][idx], multi_hot=None if mh is None else mh[idx],
        labels=labels[idx].astype(np.float32),
    )  # fmt: skip


# ---------------------------------------------------------------------------- phases
def new_domain_phases(
    model: MultiDomainModel, division: str, domain_id: int, final_stage: str, gate_scope: str
) -> list[Phase]:
    """The phases that train domain ``domain_id``'s own parameters and nothing else.

    The domain's grown embedding rows (if any) train in every one of its phases.
    """
    phases = _adapter_phases(model, division, domain_id, final_stage, gate_scope)
    domain = model.domain_names(division)[domain_id]
    if (division, domain) in model.grown:
        for ph in phases:
            ph.groups = [*ph.groups, f"rows:{division}:{domain}"]
    return phases


def _adapter_phases(
    model: MultiDomainModel, division: str, domain_id: int, final_stage: str, gate_scope: str
) -> list[Phase]:
    """The method's phases for one new domain (``Method.domain_phases``), on its rows only."""
    return [
        Phase(p.name, p.stage, p.groups, expert=p.expert, division=p.division,
              domains=[domain_id], metric_column=p.metric_column)
        for p in model.method.domain_phases(model, division, domain_id, final_stage, gate_scope)
    ]  # fmt: skip


#: refuse a domain whose rows are this alike (share of rows with the most common input)
UNIFORM_SHARE = 0.95


def refuse_uniform_rows(arrays: dict[str, Any], grow: bool) -> None:
    """Raise ``ValueError`` when (nearly) every row has the same model input.

    Then the model scores every row of the domain alike and no adapter can change that:
    typically every id is unknown to the export and no rows were grown for them.
    """
    parts = [arrays["sparse"], arrays["dense"].view(np.int32).astype(np.int64)]
    if arrays["multi_hot"] is not None:
        parts.append(arrays["multi_hot"].reshape(len(arrays["sparse"]), -1))
    rows = np.concatenate(parts, axis=1)
    if len(rows) == 0:
        return
    _, counts = np.unique(rows, axis=0, return_counts=True)
    share = counts.max() / len(rows)
    if share >= UNIFORM_SHARE:
        why = (
            "its ids are unknown to the export and --no-grow keeps them that way: drop "
            "--no-grow so add-domain grows embedding rows for them"
            if not grow
            else "its ids are unknown to the export and too rare to grow rows for (the "
            "encoder's min_count), and it has no other features that vary"
        )
        raise ValueError(
            f"{100 * share:.1f}% of the new domain's rows have the same model input, so the "
            f"model would score them all alike: {why}"
        )


def _val_auc(model: MultiDomainModel, batch: Any) -> float | None:
    probs = predict(model, batch)
    return compute_metrics(
        batch.labels.cpu().numpy(), probs, np.zeros(len(batch), dtype=np.int64), ["new"]
    ).domains[0].auc  # fmt: skip


def train_new_domain(
    model: MultiDomainModel,
    encoder: FeatureEncoder,
    division: str,
    domain: str,
    df: pd.DataFrame,
    labels: np.ndarray,
    settings: AddDomainSettings,
    lr: float,
    batch_size: int,
    l2: float = 1e-5,
) -> AddDomainResult:
    """Grow ``encoder`` and ``model`` by ``domain`` and train its parameters on ``df``.

    With ``settings.grow``, values of the domain's training rows that the export never saw
    (new users, items, ...) get vocabulary entries scoped to the domain and embedding rows
    that train with its adapter (``mdlora.formats.grown``, ``mdlora.models.rows``). Works on the
    objects given (the caller holds copies it can drop on failure).
    """
    cfg = model.config
    div_i = cfg.division_index(division)
    adapted = model.method.adapted
    if div_i >= adapted:
        raise ValueError(
            f"division {division!r} has no per-domain adapters in a {cfg.method} model; "
            f"choose one of {[d.name for d in cfg.divisions[:adapted]]}"
        )
    if domain in model.domain_names(division):
        raise ValueError(f"division {division!r} already has a domain {domain!r}")
    final_stage = model.stage
    # the model's divisions own the domain list; the encoder takes it from them
    domain_id = model.add_domain(division, domain, settings.gate_scope)
    encoder.set_domains(model_domains(model.config))
    train_idx, val_idx = _split(len(df), labels, settings.val_fraction, settings.seed)
    grown: dict[str, list[str]] = {}
    if settings.grow:  # vocabularies from the training rows only, as the export's were
        grown = new_values(encoder, df.iloc[train_idx])
    if grown:
        encoder.set_grown(division, domain, grown)
        grow_domain_rows(model, division, domain, region_fields(encoder, grown))
        place(encoder, model)
    arrays = encoder.transform(df)
    refuse_uniform_rows(dict(arrays), settings.grow)
    device = model.device
    train = to_batch(_take(dict(arrays), labels, train_idx), device)
    val = to_batch(_take(dict(arrays), labels, val_idx), device)
    model.set_stage("backbone")
    before = _val_auc(model, val)
    # L2 reaches only the grown rows: every other row of the tables is frozen
    loop = LoopSettings(
        batch_size=batch_size, l2=l2 if grown else 0.0, patience=settings.patience,
        seed=settings.seed, progress=settings.progress, eval_every=settings.eval_every,
    )  # fmt: skip
    phases = new_domain_phases(model, division, domain_id, final_stage.name, settings.gate_scope)
    results = []
    for i, ph in enumerate(phases):
        ph.epochs, ph.lr = settings.epochs, settings.gate_lr if ph.stage == "gate" else lr
        results.append(train_phase(model, ph, train, val, loop, phase_index=i))
    model.set_stage(final_stage.name, expert=final_stage.expert, division=final_stage.division)
    model.eval()
    return AddDomainResult(
        division=division, domain=domain, domain_id=domain_id, version=0, package_dir=None,
        encoder=encoder, phases=results, rows_train=len(train_idx), rows_val=len(val_idx),
        val_auc_backbone=before, val_auc=_val_auc(model, val),
        grown={c: len(v) for c, v in grown.items()},
    )  # fmt: skip


def add_domain(
    artifact: Path,
    data: Path,
    domain: str,
    *,
    division: str | None = None,
    out: Path | None = None,
    settings: AddDomainSettings | None = None,
    label: str | None = None,
    version: int = 1,
    artifact_out: Path | None = None,
    positive_labels: list[Any] | None = None,
) -> AddDomainResult:
    """The ``mdlora add-domain`` command (see the module docstring).

    ``label`` / ``positive_labels`` default to the training run's (its schema's label column
    and the values it counted as clicks).
    """
    settings = settings or AddDomainSettings()
    artifact = Path(artifact)
    if artifact_out is not None:
        if Path(artifact_out).resolve() == artifact.resolve():
            raise ArtifactError(
                f"--artifact-out {artifact_out} is the artifact being read: write the grown "
                "artifact to a new folder (a service may be serving this one)"
            )
        check_artifact_target(artifact_out)  # before the training, not after it
    art = load_artifact(artifact)
    if art.encoder is None:
        raise ArtifactError(f"{artifact} has no encoder.json: add-domain needs the encoder")
    encoder = FeatureEncoder.from_dict(art.encoder)
    model = art.model.to(pick_device(settings.device))
    division = division or model.config.divisions[0].name
    model.config.division(division)  # a clear KeyError for an unknown division
    training = art.manifest.get("training", {})
    run_cfg = training.get("config", {})
    label = label or training.get("label_column", "label")
    positive = positive_labels or training.get("positive_labels")
    lr = settings.lr or float(art.manifest.get("metrics", {}).get("hparams", {}).get("lr", 1e-3))
    run_batch = int(art.manifest.get("metrics", {}).get("hparams", {}).get("batch_size", 1024))
    if version < 1:
        raise ValueError(f"--version must be >= 1, got {version}")
    out = out or Path(f"{artifact}-adapters") / division / domain / str(version)
    adapter_dir(Path("."), division, domain, version)  # refuses names unusable as paths
    df, labels = read_domain_rows(Path(data), encoder, division, domain, str(label), positive)
    batch_size = settings.batch_size or default_batch_size(
        run_batch, int(len(df) * (1 - settings.val_fraction))
    )
    torch.manual_seed(settings.seed)
    l2 = settings.l2
    if l2 is None:
        l2 = float(art.manifest.get("metrics", {}).get("hparams", {}).get("l2", 1e-5))
    result = train_new_domain(
        model, encoder, division, domain, df, labels, settings, lr, batch_size, l2
    )
    metrics = {
        "val_auc_backbone": result.val_auc_backbone, "val_auc": result.val_auc,
        "rows_train": result.rows_train, "rows_val": result.rows_val,
        "grown": result.grown, "warnings": result.warnings(),
    }  # fmt: skip
    values = encoder.grown.get(division, {}).get(domain)
    backbone_sha = art.manifest.get("files", {}).get(BACKBONE_WEIGHTS, {}).get("sha256")
    pkg = make_adapter_package(
        model, division, domain, version, backbone_sha, gate_scope=settings.gate_scope,
        metrics=metrics, **({GROWN_VOCAB: values} if values else {}),
        trained_from=str(run_cfg.get("name", artifact.name)),
    )  # fmt: skip
    write_adapter_package(pkg, out)
    (out / ENCODER).write_text(json.dumps(encoder.to_dict()))
    result.package_dir, result.version = out, version
    if artifact_out is not None:
        save_artifact(
            model, artifact_out, encoder=encoder.to_dict(),
            metrics=art.manifest.get("metrics", {}),
            extra={"training": training, "added_domains": [
                *art.manifest.get("added_domains", []),
                {"division": division, "domain": domain, **metrics}]},
        )  # fmt: skip
        result.artifact_out = artifact_out
    return result
