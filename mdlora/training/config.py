"""Experiment configuration: one YAML file per experiment, plus ``key=value`` overrides.

A config names the data (a preset, the synthetic generator, or the user's own table), the
training method, the model's settings (the ``model:`` block, checked by the core's
``ModelConfig``) and the training knobs. Model and training knobs left out (``null``) take
the data setting's published values (``PreparedData.hparams``, e.g. embedding 8, tower
[256, 128, 64], lr 1e-3, batch 1024, L2 1e-5 for the MLoRA setting), then the defaults.

Overrides are ``key=value`` with YAML values: ``method=moe model.backbone=dcn epochs=2
model.tower=[128,64] data.options.max_rows=50000``. A model setting may be written without
``model.`` (``backbone=dcn``), at the top level of a file too (configs written before the
``model:`` block): it means the same setting.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
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
        if self.source == "preset":
            from mdlora.training.data.presets import PRESETS

            if self.preset not in PRESETS:
                raise ConfigError(f"data.preset {_said([str(self.preset)], PRESETS)} is not a "
                                  f"preset; use one of {sorted(PRESETS)}")  # fmt: skip
        if self.options is None:  # "options:" with nothing under it
            self.options = {}
        if not isinstance(self.options, dict):
            raise ConfigError(f"data.options must be a mapping (e.g. {{max_rows: 50000}}), "
                              f"got {self.options!r}")  # fmt: skip
        self.options = _checked_options(self.options)


@dataclass
class TrainConfig:
    """Every knob of one experiment (``null`` model/training values: the data setting's)."""

    name: str = "run"  # run name; the default output folder is runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    # ---- method and model
    method: str = "mlora"  # one of METHODS
    #: the model's settings (``mdlora.models.model.SETTINGS``: backbone, embed_dim, tower,
    #: dropout, activation, tower_norm, backbone_options, alpha, ranks, experts_per_domain,
    #: gate_dim, fusion, fusion_rank), checked by building the core's ``ModelConfig`` from them.
    #: Left out: the data setting's published value (embed_dim, tower, dropout, alpha, ranks,
    #: fusion_rank; alpha then ``DEFAULT_ALPHA``), else ``ModelConfig``'s default
    model: dict[str, Any] = field(default_factory=dict)
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
        for name in ("phase_epochs", "phase_lr"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping of phase kind to value (e.g. "
                                  f"{{gate: 2}}), got {getattr(self, name)!r}")  # fmt: skip
        # YAML 1.1 reads "1e-3" (no dot) as a string
        for name in ("lr", "l2"):
            setattr(self, name, _number(name, getattr(self, name)))
        self.phase_lr = {k: float(_number(f"phase_lr.{k}", v)) for k, v in self.phase_lr.items()}
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        for key in (*self.phase_epochs, *self.phase_lr):
            if key not in PHASE_KINDS:
                raise ConfigError(f"phase_epochs/phase_lr key {key!r} is not one of {PHASE_KINDS}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.l2 is not None and self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        for k, v in self.phase_lr.items():
            if not v >= 0:
                raise ConfigError(f"phase_lr.{k} must be >= 0, got {v}")
        self._check_integers()
        self._check_adapt_rows()
        self._check_model()

    def _check_integers(self) -> None:
        """Integer knobs: whole numbers only (``2.0`` is 2; ``2.5``, ``true``, ``"abc"`` are
        refused rather than truncated)."""
        for name in ("epochs", "patience", "eval_batch_size"):
            setattr(self, name, integer(name, getattr(self, name)))
        self.seed = integer("seed", self.seed, minimum=None)
        for name in ("batch_size", "threads"):
            if getattr(self, name) is not None:
                setattr(self, name, integer(name, getattr(self, name)))
        if self.eval_every is not None:
            self.eval_every = integer(
                "eval_every", self.eval_every, hint="(steps), or null (once per epoch)"
            )
        self.phase_epochs = {
            k: integer(f"phase_epochs.{k}", v, minimum=0) for k, v in self.phase_epochs.items()
        }

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
        """Refuse model settings the core refuses, by building a ``ModelConfig`` from them on a
        placeholder input layout (the real one comes from the data)."""
        from mdlora.models.backbones import build_interaction
        from mdlora.models.model import SETTINGS, ModelConfig

        if self.model is None:  # "model:" with nothing under it
            self.model = {}
        if not isinstance(self.model, dict):
            raise ConfigError(f"model must be a mapping of model settings {SETTINGS}")
        unknown = sorted(set(self.model) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown model setting(s) {_said(unknown, SETTINGS)}")
        model = {k: v for k, v in self.model.items() if v is not None}  # null: left out
        for name in ("dropout", "alpha"):  # YAML 1.1 reads "1e-3" (no dot) as a string
            if name in model:
                model[name] = _number(f"model.{name}", model[name])
        for name in ("tower", "ranks"):  # a tuple from the Python API is a list
            if isinstance(model.get(name), tuple):
                model[name] = list(model[name])
        if isinstance(model.get("backbone"), str):
            model["backbone"] = model["backbone"].lower()  # "DeepFM" is deepfm
        self.model = model
        probe = dict(model)
        if probe.get("ranks") is None and probe.get("alpha") is None:
            probe["alpha"] = DEFAULT_ALPHA  # the data setting's value is not known yet
        features, divisions = _probe_layout()
        try:
            checked = ModelConfig(features=features, divisions=divisions,
                                  method=self.model_method, **probe)  # fmt: skip
            build_interaction(checked.backbone, 2, checked.embed_dim, 1,
                              dict(checked.backbone_options))  # fmt: skip
        except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. FiBiNET reduction 0
            raise ConfigError(f"model: {exc}") from None

    def setting(self, name: str) -> Any:
        """Model setting ``name`` as the config gives it; left out, ``None`` for those the data
        setting supplies (``DATA_SETTINGS``), else ``ModelConfig``'s default."""
        if name in self.model:
            return self.model[name]
        return None if name in DATA_SETTINGS else model_default(name)

    @property
    def backbone(self) -> str:
        return str(self.setting("backbone"))

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
        from mdlora.models.model import SETTINGS

        d = self.to_dict()
        del d["model"]  # runs were fingerprinted with the model settings at the top level
        # the settings there were then always in; one the core gains later only when set, so
        # a new field (or its default) leaves earlier runs' fingerprints as they were
        d.update({name: self.setting(name) for name in SETTINGS
                  if name in FIRST_SETTINGS or name in self.model})  # fmt: skip
        for key in ("out", "export", "onnx", "resume", "progress", "name", "eval_batch_size"):
            d.pop(key, None)
        for key, default in LATER_DEFAULTS.items():
            if d.get(key) == default:
                d.pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: model settings that, left out, take the data setting's published value
#: (``PreparedData.hparams``, resolved by ``mdlora.training.run.resolve_hparams``)
DATA_SETTINGS = ("embed_dim", "tower", "dropout", "alpha", "ranks", "fusion_rank")


def model_default(name: str) -> Any:
    """``ModelConfig``'s default for model setting ``name`` (the core owns the defaults)."""
    from mdlora.models.model import ModelConfig

    f = ModelConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _probe_layout() -> tuple[Any, Any]:
    """A two-field, two-division input layout to check model settings on before the data's
    real one is known."""
    from mdlora.models.features import FeatureSpec, SparseField
    from mdlora.models.model import Division

    spec = FeatureSpec(sparse=(SparseField("a", 2), SparseField("b", 2)))
    return spec, (Division("first", ("x",)), Division("second", ("y",)))


def _said(unknown: list[str], known: Any) -> str:
    """``unknown`` keys, each with the closest of ``known`` when there is one."""
    hints = [difflib.get_close_matches(u, sorted(known), n=1) for u in unknown]
    return ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                     for u, h in zip(unknown, hints, strict=True))  # fmt: skip


def lift_model_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with model settings written at the top level (configs before the ``model:``
    block) moved into ``model``; one set in both places with different values is refused."""
    from mdlora.models.model import SETTINGS

    flat = [k for k in raw if k in SETTINGS]
    if not flat:
        return raw
    out = dict(raw)
    block = out.get("model") or {}
    if not isinstance(block, dict):
        raise ConfigError(f"'model' must be a mapping of model settings {SETTINGS}")
    block = dict(block)
    for key in flat:
        value = out.pop(key)
        if key in block and block[key] != value:
            raise ConfigError(
                f"{key!r} is set twice, at the top level ({value!r}) and under model: "
                f"({block[key]!r}); keep model.{key}"
            )
        block[key] = value
    out["model"] = block
    return out


#: the model settings fingerprints were first taken with (at the top level of the config)
FIRST_SETTINGS = ("backbone", "embed_dim", "tower", "dropout", "activation", "tower_norm",
                  "backbone_options", "alpha", "ranks", "experts_per_domain", "gate_dim",
                  "fusion", "fusion_rank")  # fmt: skip

#: fields added after runs were cached: their defaults do not enter the fingerprint
LATER_DEFAULTS: dict[str, Any] = {
    "eval_every": None, "adapt_rows": "all", "adapt_fraction": 0.2, "adapt_order": None,
}  # fmt: skip


def _number(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


def integer(name: str, value: Any, minimum: int | None = 1, hint: str = "") -> int:
    """``value`` as an ``int``: an integer, or a float with nothing after the point (``2.0``);
    a boolean, a string or ``2.5`` is refused (a ConfigError naming ``name``), not truncated."""
    whole = (
        isinstance(value, numbers.Integral)
        or (isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    ) and not isinstance(value, bool)
    if not whole or (minimum is not None and int(value) < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{name} must be an integer{bound}{' ' + hint if hint else ''}, "
                          f"got {value!r}")  # fmt: skip
    return int(value)


#: ``data.options`` that are counts (at least 1) or seeds (at least 0), for every data source
#: that takes them (the preparing functions refuse the options they do not take)
INTEGER_OPTIONS = {"n_rows": 1, "n_domains": 1, "n_users": 1, "n_items": 1, "n_segments": 1,
                   "n_categories": 1, "n_tags": 1, "max_tags": 1, "max_rows": 1,
                   "batch_rows": 1, "seed": 0}  # fmt: skip


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the counts, seeds and ``sample_frac`` checked (``null``: left out)."""
    out = dict(options)
    for key, minimum in INTEGER_OPTIONS.items():
        if out.get(key) is not None:
            out[key] = integer(f"data.options.{key}", out[key], minimum)
    frac = out.get("sample_frac")
    if frac is not None:
        frac = _number("data.options.sample_frac", frac)
        if not isinstance(frac, numbers.Real) or not 0 < float(frac) <= 1:
            raise ConfigError(f"data.options.sample_frac must be a number in (0, 1], got {frac!r}")
        out["sample_frac"] = frac
    return out


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
    from mdlora.models.model import SETTINGS

    out = lift_model_settings(json.loads(json.dumps(raw)))  # a deep copy of plain YAML data
    top = {f.name for f in fields(TrainConfig)} | set(SETTINGS)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method=moe)")
        parts = key.split(".")
        if parts[0] in SETTINGS:
            parts = ["model", *parts]  # backbone=dcn is model.backbone=dcn
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
    raw = lift_model_settings(raw)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {_said(unknown, known)}")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError("'data' must be a mapping (source, preset, path, schema, options)")
    try:
        return TrainConfig(**{**raw, "data": make_data_config(data)})
    except TypeError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config file and apply ``key=value`` overrides.

    The file must name its data (``data.source``): generated rows are only used when asked
    for (``source: synthetic``), never as a silent default as in :class:`DataConfig`.
    """
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
    merged = apply_overrides(raw, overrides or [])
    cfg = config_from_dict(merged)
    data = merged.get("data")
    if not isinstance(data, dict) or not data.get("source"):  # no silent synthetic default
        raise ConfigError(
            f"{p} does not say which rows to train on: set data.source: preset (with "
            "data.preset, data.path), table (data.path, data.schema) or synthetic for "
            "generated rows; see configs/"
        )
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_path(path: str) -> Path:
    """A data path as given, else relative to the repository root (``../shared/data/...``)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p
