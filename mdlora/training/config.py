"""Experiment configuration: one YAML file per experiment, plus ``key=value`` overrides.

A config names the data (a preset, the synthetic generator, or the user's own table), the
method and backbone, and the training knobs. Model and training knobs left out (``null``) take
the data setting's published values (``PreparedData.hparams``, e.g. embedding 8, tower
[256, 128, 64], lr 1e-3, batch 1024, L2 1e-5 for the MLoRA setting), then the defaults below.

Overrides are ``key=value`` with YAML values: ``method=moe backbone=dcn epochs=2
tower=[128,64] data.options.max_rows=50000``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Recipe:
    """A training method: the model it builds (``models.methods``) and how it trains.

    ``trainer`` names how its phases run (``mdlora.training.run.TRAINERS``): ``phased`` (the
    model method's phases in order), ``per_domain`` (Single: a backbone per domain),
    ``finetune`` (Mix, then a copy fine-tuned per domain), ``joint`` (backbone and adapters in
    one phase, the public MLoRA code's recipe) or ``finetune_fresh`` (the backbone, then all of
    it fine-tuned on the fresh rows; ``mdlora.training.recipes``).
    """

    label: str  # how reports and summaries name it (the one table of labels)
    model_method: str
    trainer: str = "phased"
    fresh: bool = False  # its later phases can train on the fresh slice (adapt_rows: fresh)
    always_fresh: bool = False  # what it is: its second phase on the fresh slice
    natural_only: bool = False  # SingleLoRA: the natural division's LoRA set, no fusion


#: training methods: baselines, the three methods, MultiLoRA's SingleLoRA ablation, the public
#: MLoRA code's one-phase recipe (mlora_joint) and the backbone fine-tuned on the fresh rows
#: that the adapters of ``adapt_rows: fresh`` train on (finetune_fresh)
RECIPES: dict[str, Recipe] = {
    "base": Recipe("Base", "base"),
    "single": Recipe("Single", "base", trainer="per_domain"),
    "finetune": Recipe("Fine-tune", "base", trainer="finetune"),
    "mlora": Recipe("MLoRA", "mlora", fresh=True),
    "moe": Recipe("MoE-MLoRA", "moe", fresh=True),
    "multilora": Recipe("MultiLoRA", "multilora", fresh=True),
    "singlelora": Recipe("SingleLoRA", "multilora", fresh=True, natural_only=True),
    "mlora_joint": Recipe("MLoRA (joint)", "mlora", trainer="joint"),
    "finetune_fresh": Recipe("Fine-tune (fresh rows)", "base", trainer="finetune_fresh",
                             fresh=True, always_fresh=True),
}  # fmt: skip
METHODS = tuple(RECIPES)
METHOD_LABELS = {name: r.label for name, r in RECIPES.items()}
#: ModelConfig.method each training method builds
MODEL_METHOD = {name: r.model_method for name, r in RECIPES.items()}
#: methods whose later phases can train on the fresh slice (``adapt_rows: fresh``)
FRESH_METHODS = tuple(name for name, r in RECIPES.items() if r.fresh)
ADAPT_ROWS = ("all", "fresh")
DATA_SOURCES = ("preset", "synthetic", "table")
#: phase kinds that ``phase_epochs`` / ``phase_lr`` may name
PHASE_KINDS = ("backbone", "adapters", "expert", "gate", "lora", "fusion", "finetune", "single",
               "joint")  # fmt: skip

REPO_ROOT = Path(__file__).resolve().parents[2]


#: rank temperature where neither the config nor the data setting gives one (own data,
#: synthetic data): ranks 16, 8, 4 for the default tower 256-128-64
DEFAULT_ALPHA = 16.0


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


@dataclass
class DataConfig:
    """Where the rows come from.

    ``source``: ``preset`` (``preset`` names one of ``mdlora.training.data.presets.PRESETS``,
    ``path`` is its data folder), ``synthetic``
    (``mdlora.training.data.synthetic.synthetic_setting``), or ``table`` (the user's
    Parquet/CSV at ``path`` with ``schema``, a ``TableSchema`` dict). ``options`` go to the
    preparing function as keyword arguments (e.g. ``max_rows``, ``sample_frac``, ``n_rows``,
    ``n_domains``, ``split``, ``split_column``); for a table, ``streaming: true`` (and
    ``batch_rows``) reads a file larger than memory chunk by chunk
    (``mdlora.training.data.streaming``).
    """

    source: str = "synthetic"
    preset: str | None = None
    path: str | None = None
    schema: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source == "preset" and not self.preset:
            raise ConfigError("data.source 'preset' needs data.preset (e.g. ml1m-mlora-gender)")
        if self.source in ("preset", "table") and not self.path:
            raise ConfigError(f"data.source {self.source!r} needs data.path")
        if self.source == "table" and not self.schema:
            raise ConfigError(
                "data.source 'table' needs data.schema: label, divisions, sparse, "
                "multi_hot, dense (see configs/user-table.yaml)"
            )


@dataclass
class TrainConfig:
    """Every knob of one experiment (``null`` model/training values: the data setting's)."""

    name: str = "run"  # run name; the default output folder is runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    # ---- method and model
    method: str = "mlora"  # one of METHODS
    backbone: str = "deepfm"  # mlp, wdl, deepfm, nfm, autoint, pnn, dcn, fibinet, xdeepfm
    embed_dim: int | None = None
    tower: list[int] | None = None
    dropout: float | None = None
    activation: str = "relu"
    tower_norm: str = "none"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    # MLoRA rank temperature (ranks max(out / alpha, 1)); None: the data setting's published
    # value for the backbone (MovieLens, Taobao presets), else DEFAULT_ALPHA
    alpha: float | None = None
    ranks: list[int] | None = None  # explicit per-layer adapter ranks
    experts_per_domain: int = 1  # MoE-MLoRA
    gate_dim: int = 4  # MoE-MLoRA gate's domain embedding size
    fusion: str = "attention"  # MultiLoRA fusion: attention, add, avg
    fusion_rank: int | None = None
    # ---- optimisation
    epochs: int = 10  # maximum epochs of every phase (early stopping usually ends sooner)
    phase_epochs: dict[str, int] = field(default_factory=dict)  # per phase kind
    lr: float | None = None
    phase_lr: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None
    l2: float | None = None  # explicit L2 on embeddings and linear / cross parts
    patience: int = 3  # early stopping on the mean per-domain validation AUC (evaluations)
    eval_every: int | None = None  # validate every N optimiser steps (None: once per epoch)
    seed: int = 2024
    # ---- which training rows the phases after the first use (training.fresh)
    adapt_rows: str = "all"  # all: every phase on all rows; fresh: see adapt_fraction
    adapt_fraction: float = 0.2  # fresh: this share of each domain's training rows is kept
    # out of phase 1 (the backbone) and is all the later phases train on
    adapt_order: str | None = None  # fresh: a table column (seq_pos, a timestamp) ordering the
    # rows; the fresh slice is then each domain's most recent rows, else a stratified sample
    # ---- execution
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:1 ...
    amp: bool = False  # mixed precision (float16 on CUDA, bfloat16 on CPU)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    eval_batch_size: int = 16384
    progress: bool = True
    # ---- outputs
    out: str | None = None  # run folder (default runs/<name>)
    export: bool = True  # write the artifact at the end of training
    onnx: bool = True  # also the ONNX scorer, when mdlora.formats.onnx_export is available
    resume: bool = False  # reuse finished phases' checkpoints in the run folder

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = make_data_config(self.data)
        # YAML 1.1 reads "1e-3" (no dot) as a string
        for name in ("lr", "l2", "dropout", "alpha"):
            setattr(self, name, _number(name, getattr(self, name)))
        self.phase_lr = {k: float(_number(f"phase_lr.{k}", v)) for k, v in self.phase_lr.items()}
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.fusion not in ("attention", "add", "avg"):
            raise ConfigError(f"fusion must be attention, add or avg, got {self.fusion!r}")
        for key in (*self.phase_epochs, *self.phase_lr):
            if key not in PHASE_KINDS:
                raise ConfigError(f"phase_epochs/phase_lr key {key!r} is not one of {PHASE_KINDS}")
        for name in ("epochs", "patience", "eval_batch_size", "experts_per_domain"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_every is not None and (
            not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool)
            or self.eval_every < 1
        ):  # fmt: skip
            raise ConfigError(
                f"eval_every must be an integer >= 1 (steps) or null (once per epoch), "
                f"got {self.eval_every!r}"
            )
        self._check_adapt_rows()
        self._check_model()

    def _check_adapt_rows(self) -> None:
        self.adapt_fraction = float(_number("adapt_fraction", self.adapt_fraction))
        if self.adapt_rows not in ADAPT_ROWS:
            raise ConfigError(f"adapt_rows must be one of {ADAPT_ROWS}, got {self.adapt_rows!r}")
        if self.recipe.always_fresh:
            self.adapt_rows = "fresh"  # what the method is: phase 2 on the fresh slice
        if self.adapt_rows == "fresh" and not self.recipe.fresh:
            raise ConfigError(
                f"adapt_rows: fresh needs a method with phases after the backbone "
                f"{FRESH_METHODS}, got method {self.method!r}"
            )
        if not 0 < self.adapt_fraction < 1:
            raise ConfigError(f"adapt_fraction must be in (0, 1), got {self.adapt_fraction}")
        if self.adapt_order is not None:
            if not isinstance(self.adapt_order, str) or not self.adapt_order:
                raise ConfigError(f"adapt_order must be a column name, got {self.adapt_order!r}")
            if self.adapt_rows != "fresh":
                raise ConfigError(
                    "adapt_order orders the fresh rows: it needs adapt_rows: fresh "
                    "(or method finetune_fresh)"
                )
            if self.data.source != "table":
                raise ConfigError(
                    f"adapt_order names a column of your table: it needs data.source: table, "
                    f"got {self.data.source!r}"
                )

    def _check_model(self) -> None:
        from mdlora.models.backbones import BACKBONES
        from mdlora.models.tower import ACTIVATIONS

        if isinstance(self.backbone, str):
            self.backbone = self.backbone.lower()  # "DeepFM" is deepfm
        for name in ("tower", "ranks"):  # a tuple from the Python API is a list
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))

        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.tower_norm not in ("none", "batch"):
            raise ConfigError(f"tower_norm must be 'none' or 'batch', got {self.tower_norm!r}")

        if self.backbone not in BACKBONES:
            hint = difflib.get_close_matches(str(self.backbone), list(BACKBONES), n=1)
            raise ConfigError(
                f"unknown backbone {self.backbone!r}; choose from {sorted(BACKBONES)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        for name in ("embed_dim", "threads", "gate_dim", "fusion_rank"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("tower", "ranks"):
            v = getattr(self, name)
            if v is not None and (
                not isinstance(v, list)
                or not v
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v)
            ):
                raise ConfigError(f"{name} must be a non-empty list of integers >= 1, got {v!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("lr", "alpha"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be > 0, got {v}")
        if self.l2 is not None and self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        for k, v in self.phase_lr.items():
            if not v >= 0:
                raise ConfigError(f"phase_lr.{k} must be >= 0, got {v}")

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.method]

    @property
    def model_method(self) -> str:
        return self.recipe.model_method

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of what determines the trained weights (not outputs, progress or resume).

        Keys added later are left out while they hold their defaults, so runs (and their
        resumable checkpoints) made before they existed keep their fingerprint.
        """
        d = self.to_dict()
        for key in ("out", "export", "onnx", "resume", "progress", "name", "eval_batch_size"):
            d.pop(key, None)
        for key, default in LATER_DEFAULTS.items():
            if d.get(key) == default:
                d.pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: fields added after runs were cached: their defaults do not enter the fingerprint
LATER_DEFAULTS: dict[str, Any] = {
    "eval_every": None, "adapt_rows": "all", "adapt_fraction": 0.2, "adapt_order": None,
}  # fmt: skip


def _number(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


def make_data_config(d: dict[str, Any]) -> DataConfig:
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown data key(s) {unknown}; known: {sorted(known)}")
    return DataConfig(**d)


def parse_value(text: str) -> Any:
    """A YAML scalar or flow value (``2``, ``1e-3``, ``true``, ``[256,128]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {text!r}: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with each ``a.b.c=value`` override set (nested mappings created as needed)."""
    out = json.loads(json.dumps(raw))  # a deep copy of plain YAML data
    top = {f.name for f in fields(TrainConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method=moe)")
        parts = key.split(".")
        if parts[0] not in top:
            close = difflib.get_close_matches(parts[0], sorted(top), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {parts[0]!r} in override {item!r}{hint}")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = parse_value(value)
    return out


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Validate a plain mapping into a :class:`TrainConfig` (unknown keys are refused)."""
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a YAML mapping of keys to values")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        hints = [difflib.get_close_matches(u, sorted(known), n=1) for u in unknown]
        said = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                         for u, h in zip(unknown, hints, strict=True))  # fmt: skip
        raise ConfigError(f"unknown config key(s) {said}")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError("'data' must be a mapping (source, preset, path, schema, options)")
    try:
        return TrainConfig(**{**raw, "data": make_data_config(data)})
    except TypeError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config file and apply ``key=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (see configs/ for examples)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a config must be a YAML mapping of keys to values")
    raw.setdefault("name", p.stem)
    return config_from_dict(apply_overrides(raw, overrides or []))


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_path(path: str) -> Path:
    """A data path as given, else relative to the repository root (``../shared/data/...``)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p
