"""The methods as sequences of phases, and one training run from config to results.

======================  =========================================================================
method                  phases (stage: trainable groups, rows)
======================  =========================================================================
base (Mix)              backbone: backbone, all domains
single                  per domain d, a fresh model -- backbone: backbone, rows of d
finetune                backbone on all domains (Mix), then per domain d a copy fully
                        fine-tuned on the rows of d
mlora                   the papers' two-phase recipe: backbone on every row; then adapters:
                        experts (every domain's adapter at once, mixed batch), backbone frozen
mlora_joint             the public MLoRA code's one phase -- joint: backbone + experts from
                        scratch, every row (``mdlora.training.recipes``); exported as an mlora model
moe (MoE-MLoRA)         backbone; per expert e, stage expert=e: expert:<e>, rows of e's domain
                        (only that expert active); gate: gate, all domains
multilora               backbone; lora (natural division): lora:<nat> + norms:div:<nat>;
                        lora (auxiliary): lora:<aux> + norms:div:<aux>; fusion: fusion +
                        norms:cell. ``fusion=add|avg`` gives MultiLoRA-add / -avg
singlelora              backbone; lora (natural division) -- final stage "lora"
finetune_fresh          backbone on the backbone slice; finetune: backbone on the fresh slice
======================  =========================================================================

``adapt_rows: fresh`` (mlora, moe, multilora, singlelora; always for finetune_fresh) trains
phase 1 on the backbone slice and every later phase on the fresh slice only
(``mdlora.training.recipes``); each phase's ``rows`` / ``train_rows`` in ``metrics.json`` say which.

Groups come from ``mdlora.models.freeze.phase_groups`` (the core's single source of truth); this
module only orders them, attaches rows and epochs, and runs
:func:`mdlora.training.loop.train_phase`.
"""

from __future__ import annotations

import copy
import inspect
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdlora.models.features import EncodedBatch
from mdlora.models.freeze import phase_groups
from mdlora.models.methods import method_of
from mdlora.models.model import Division, ModelConfig, MultiDomainModel
from mdlora.training.checkpoints import Checkpoints
from mdlora.training.config import (
    DEFAULT_ALPHA,
    METHOD_LABELS,
    ConfigError,
    TrainConfig,
    model_default,
    resolve_path,
    save_config,
)
from mdlora.training.data.prepared import PreparedData
from mdlora.training.distributed import (
    SINGLE,
    DistContext,
    barrier,
    pick_device,
    replicas_identical,
)
from mdlora.training.evaluate import SplitMetrics, compute_metrics, markdown_table, print_summary
from mdlora.training.loop import LoopSettings, Phase, PhaseResult, predict, to_batch, train_phase
from mdlora.training.recipes import PhaseRows, finetune_fresh_phase, joint_phase, trajectory_table


def method_label(cfg: TrainConfig) -> str:
    label = METHOD_LABELS[cfg.method]
    has_fusion = "fusion" in method_of(cfg.model_method).stages and not cfg.recipe.natural_only
    fusion = cfg.setting("fusion")
    if has_fusion and fusion != "attention":
        label += f"-{fusion}"
    if cfg.adapt_rows == "fresh" and not cfg.recipe.always_fresh:
        label += " (fresh rows)"
    return label


# ------------------------------------------------------------------------------- data
def load_data(cfg: TrainConfig) -> PreparedData:
    """The prepared splits the config names (encoder fitted on the training split only)."""
    d = cfg.data
    opts = dict(d.options)
    if d.source == "synthetic":
        from mdlora.training.data.synthetic import synthetic_setting

        if "split" in opts:
            opts["split"] = tuple(opts["split"])
        return _with_options(synthetic_setting, "synthetic data", opts)
    assert d.path is not None
    path = resolve_path(d.path)
    if not path.exists():
        raise FileNotFoundError(
            f"data.path {d.path!r} not found (tried {path}); set data.path=... to your copy"
        )
    if d.source == "preset":
        from mdlora.training.data.presets import prepare_preset

        assert d.preset is not None
        try:  # a preset's function takes **kw: an option it does not know is a TypeError
            return _with_options(prepare_preset, f"preset {d.preset!r}", opts, d.preset, path)
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
            raise ConfigError(f"data.options of preset {d.preset!r}: {exc}; drop it") from None
    from mdlora.training.data.tabular import TableSchema, prepare_table

    assert d.schema is not None
    if cfg.adapt_order is not None:
        opts["order_column"] = cfg.adapt_order
    schema = TableSchema.from_dict(d.schema)
    streaming = opts.pop("streaming", False)
    if streaming not in (True, False):
        raise ConfigError(f"data.options.streaming must be true or false, got {streaming!r}")
    if streaming:  # a file larger than memory: read chunk by chunk, keep only encoded arrays
        from mdlora.training.data.streaming import prepare_table_stream

        sampled = [k for k in ("max_rows", "sample_frac") if opts.get(k) is not None]
        if sampled:
            raise ConfigError(
                f"data.options.streaming reads every row: drop {sampled} or streaming"
            )
        opts.setdefault("progress", cfg.progress)
        return _with_options(prepare_table_stream, "a streamed table", opts, path, schema)
    also = ["streaming"]  # taken above, not by prepare_table
    return _with_options(prepare_table, "a table", opts, path, schema, also=also)


def _with_options(
    fn: Callable[..., PreparedData],
    what: str,
    opts: dict[str, Any],
    *args: Any,
    also: Sequence[str] = (),
) -> PreparedData:
    """``fn(*args, **opts)``, refusing an option ``fn`` does not take, naming the ones it
    does (and ``also``, options the caller took before)."""
    params = inspect.signature(fn).parameters
    known = sorted(
        n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty
    )
    unknown = sorted(set(opts) - set(known))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"data.options {unknown} do not apply to {what}; its options: "
                          f"{sorted([*known, *also])}")  # fmt: skip
    return fn(*args, **opts)


def label_column(cfg: TrainConfig) -> str:
    """The 0/1 label column a raw table for this model has (what ``add-domain`` reads)."""
    if cfg.data.source == "table" and cfg.data.schema:
        return str(cfg.data.schema["label"])
    return "label"


def positive_labels(cfg: TrainConfig) -> list[Any] | None:
    """The table schema's ``positive_labels`` as written (None: the label is already 0/1).

    Kept as parsed, booleans included: YAML reads an unquoted ``yes`` as True, which
    ``labels_from`` matches against the spellings YAML maps to True.
    """
    if cfg.data.source == "table" and cfg.data.schema:
        pos = cfg.data.schema.get("positive_labels")
        if pos is not None:
            return list(pos) if isinstance(pos, list) else [pos]
    return None


# ------------------------------------------------------------------------------ model
@dataclass
class Hparams:
    """Resolved model and optimisation values (config, else the data setting's, else default)."""

    embed_dim: int
    tower: tuple[int, ...]
    dropout: float
    lr: float
    batch_size: int
    l2: float
    ranks: tuple[int, ...] | None
    alpha: float  # the rank temperature when ``ranks`` is None
    fusion_rank: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_hparams(cfg: TrainConfig, prepared: PreparedData) -> Hparams:
    hp = prepared.hparams

    def given(value: Any, key: str, default: Any) -> Any:
        """The config's value, else the data setting's, else ``default``."""
        return value if value is not None else hp.get(key, default)

    def pick(key: str) -> Any:
        """A model setting: the config's, else the data setting's, else the core's default."""
        return given(cfg.setting(key), key, model_default(key))

    tower = tuple(int(x) for x in pick("tower"))
    ranks = cfg.setting("ranks")
    preset_ranks = hp.get("lora_rank")
    # without explicit ranks or alpha: the setting's LoRA ranks for the methods it gives them
    # (MultiLoRA's setting: its own), when they fit the tower
    alpha_unset = cfg.setting("alpha") is None
    preset_default = cfg.model_method in hp.get("lora_rank_methods", ()) and alpha_unset
    if ranks is None and preset_default and preset_ranks and len(preset_ranks) == len(tower):
        ranks = preset_ranks
    fusion_rank = cfg.setting("fusion_rank")
    if fusion_rank is None:
        fr = hp.get("fusion_rank", 8)
        fusion_rank = int(fr[0] if isinstance(fr, list | tuple) else fr)
    return Hparams(
        embed_dim=int(pick("embed_dim")),
        tower=tower,
        dropout=float(pick("dropout")),
        lr=float(given(cfg.lr, "lr", 1e-3)),
        batch_size=int(given(cfg.batch_size, "batch_size", 1024)),
        l2=float(given(cfg.l2, "l2", 1e-5)),
        ranks=None if ranks is None else tuple(int(r) for r in ranks),
        alpha=resolve_alpha(cfg, hp),
        fusion_rank=fusion_rank,
    )


def resolve_alpha(cfg: TrainConfig, hp: dict[str, Any]) -> float:
    """The config's alpha, else the data setting's published one for the backbone, else
    ``DEFAULT_ALPHA`` (own data gets no other dataset's value)."""
    if cfg.setting("alpha") is not None:
        return float(cfg.setting("alpha"))
    published = hp.get("alpha", {})  # per backbone, or one value for every backbone
    if isinstance(published, Mapping):
        return float(published.get(cfg.backbone, DEFAULT_ALPHA))
    return float(published)


def build_model(cfg: TrainConfig, prepared: PreparedData, hp: Hparams) -> MultiDomainModel:
    divisions = tuple(Division(d, tuple(prepared.domain_names[d])) for d in prepared.divisions)
    try:
        config = ModelConfig(
            features=prepared.spec, divisions=divisions, method=cfg.model_method,
            **{**cfg.model, "backbone_options": dict(cfg.setting("backbone_options")),
               "embed_dim": hp.embed_dim, "tower": hp.tower, "dropout": hp.dropout,
               "alpha": hp.alpha, "ranks": hp.ranks, "fusion_rank": hp.fusion_rank},
        )  # fmt: skip
    except ValueError as e:  # the method's and the core's own checks, with the run's context
        raise ConfigError(
            f"method {cfg.method!r} on data {prepared.name!r} (divisions "
            f"{[d.name for d in divisions]}): {e}"
        ) from None
    return MultiDomainModel(config)


def plan_phases(model: MultiDomainModel, cfg: TrainConfig, hp: Hparams) -> list[Phase]:
    """The method's phases in training order (see the module docstring)."""
    mcfg = model.config
    nat = mcfg.divisions[0].name
    phases: list[Phase] = []
    for name, groups in phase_groups(model).items():
        kind, _, rest = name.partition(":")
        if cfg.recipe.natural_only and (kind == "fusion" or (kind == "lora" and rest != nat)):
            continue
        ph = Phase(name=name, stage=kind, groups=list(groups))
        if kind == "expert":
            assert model.gate is not None
            ph.expert = int(rest)
            ph.domains = [int(model.gate.owner[ph.expert])]
        elif kind == "lora":
            ph.division = rest
            ph.metric_column = mcfg.division_index(rest)
        phases.append(ph)
    for ph in phases:
        ph.epochs = int(cfg.phase_epochs.get(ph.kind, cfg.epochs))
        ph.lr = float(cfg.phase_lr.get(ph.kind, hp.lr))
    return phases


def final_stage(model: MultiDomainModel, cfg: TrainConfig) -> None:
    """Leave the model in the stage it is exported and scored with."""
    if cfg.recipe.natural_only:
        model.set_stage("lora", division=model.config.divisions[0].name)
    else:
        model.set_stage(model.method.final_stage)


# ------------------------------------------------------------------------------- runs
@dataclass
class TrainedModels:
    """What a method produced: one model for every domain, or one per domain (Single,
    Fine-tune), keyed by primary-division domain id."""

    model: MultiDomainModel | None = None
    per_domain: dict[int, MultiDomainModel] = field(default_factory=dict)

    def models(self) -> list[MultiDomainModel]:
        return [self.model] if self.model is not None else list(self.per_domain.values())

    def predict(self, batch: EncodedBatch, batch_size: int = 16384) -> np.ndarray:
        if self.model is not None:
            return predict(self.model, batch, batch_size)
        probs = np.zeros(len(batch), dtype=np.float32)
        primary = batch.domains[:, 0]
        for d, model in self.per_domain.items():
            rows = (primary == d).nonzero().squeeze(1)
            probs[rows.cpu().numpy()] = predict(model, batch.select(rows), batch_size)
        return probs


def evaluate_divisions(
    trained: TrainedModels, batch: EncodedBatch, prepared: PreparedData, batch_size: int
) -> dict[str, SplitMetrics]:
    """Metrics of ``batch`` under every division of the data (primary first)."""
    probs = trained.predict(batch, batch_size)
    assert batch.labels is not None
    labels = batch.labels.cpu().numpy()
    domains = batch.domains.cpu().numpy()
    return {
        div: compute_metrics(labels, probs, domains[:, j], prepared.domain_names[div], div)
        for j, div in enumerate(prepared.divisions)
    }


@dataclass
class RunResult:
    config: TrainConfig
    prepared: PreparedData
    hparams: Hparams
    trained: TrainedModels
    phases: list[PhaseResult]
    test: dict[str, SplitMetrics]
    val: dict[str, SplitMetrics]
    reference: dict[str, SplitMetrics] | None  # test metrics of the phase-1 backbone
    reference_label: str | None
    out_dir: Path
    seconds: float
    artifacts: list[Path] = field(default_factory=list)
    distributed: dict[str, Any] = field(default_factory=dict)  # world size, replica check
    adapt_rows: dict[str, Any] = field(default_factory=dict)  # the slices, when fresh

    def unchanged_phases(self) -> list[str]:
        """Phases after the first that no epoch improved (early stopping restored their start)."""
        return [p.name for p in self.phases[1:] if p.best_epoch == 0]

    @property
    def primary(self) -> str:
        return self.prepared.divisions[0]

    def metrics_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "label": method_label(self.config),
            "backbone": self.config.backbone,
            "data": self.prepared.name,
            "seed": self.config.seed,
            "hparams": self.hparams.to_dict(),
            "wauc": self.test[self.primary].wauc,
            "test": {k: v.to_dict() for k, v in self.test.items()},
            "val": {k: v.to_dict() for k, v in self.val.items()},
            "reference": None if self.reference is None else {
                "label": self.reference_label,
                "test": {k: v.to_dict() for k, v in self.reference.items()},
            },
            "adapt_rows": self.adapt_rows,
            "eval_every": self.config.eval_every,
            "phases": [p.to_dict() for p in self.phases],
            "seconds": self.seconds,
            "distributed": self.distributed,
        }  # fmt: skip

    def tables(self) -> dict[str, dict[str, SplitMetrics]]:
        """Per division: run label -> test metrics (the phase-1 backbone first, if any)."""
        out: dict[str, dict[str, SplitMetrics]] = {}
        for div in self.prepared.divisions:
            cols: dict[str, SplitMetrics] = {}
            if self.reference is not None and self.reference_label:
                cols[self.reference_label] = self.reference[div]
            cols[method_label(self.config)] = self.test[div]
            out[div] = cols
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RecipeRun:
    """What a recipe's trainer works with: one run's settings, data and phase runner."""

    cfg: TrainConfig
    hp: Hparams
    prepared: PreparedData
    test: EncodedBatch
    names: list[str]  # the primary division's domains, in id order
    run_phase: Callable[[MultiDomainModel, str, int, Phase], None]  # (model, tag, index, ph)
    fresh_model: Callable[[], MultiDomainModel]

    def evaluate(self, model: MultiDomainModel) -> dict[str, SplitMetrics]:
        return evaluate_divisions(
            TrainedModels(model), self.test, self.prepared, self.cfg.eval_batch_size
        )


#: what a trainer gives back: the trained models, and the reference (a phase-1 model) they are
#: compared with in the report, with its label
Trained = tuple[TrainedModels, dict[str, SplitMetrics] | None, str | None]


def train_phased(r: RecipeRun) -> Trained:
    """The model method's phases in order; the backbone alone is the reference when later
    phases follow it."""
    model, reference = r.fresh_model(), None
    for i, ph in enumerate(plan_phases(model, r.cfg, r.hp)):
        r.run_phase(model, "model", i, ph)
        if ph.name == "backbone" and method_of(r.cfg.model_method).stages[1:]:
            reference = r.evaluate(model)
    final_stage(model, r.cfg)
    return TrainedModels(model), reference, None if reference is None else "Base (phase 1)"


def train_per_domain(r: RecipeRun) -> Trained:
    """Single: one backbone per domain, each trained on its domain's rows only."""
    trained = TrainedModels()
    for d, name in enumerate(r.names):
        model = r.fresh_model()
        ph = Phase(f"single:{name}", "backbone", ["backbone"], domains=[d],
                   epochs=r.cfg.phase_epochs.get("single", r.cfg.epochs),
                   lr=r.cfg.phase_lr.get("single", r.hp.lr))  # fmt: skip
        r.run_phase(model, f"domain{d}", 0, ph)
        trained.per_domain[d] = model
    return trained, None, None


def train_finetune(r: RecipeRun) -> Trained:
    """Fine-tune: the Mix backbone (the reference), then a copy fine-tuned per domain."""
    mix = r.fresh_model()
    (ph,) = plan_phases(mix, r.cfg, r.hp)
    r.run_phase(mix, "model", 0, ph)
    reference = r.evaluate(mix)
    trained = TrainedModels()
    for d, name in enumerate(r.names):
        model = copy.deepcopy(mix)
        ph = Phase(f"finetune:{name}", "backbone", ["backbone"], domains=[d],
                   epochs=r.cfg.phase_epochs.get("finetune", r.cfg.epochs),
                   lr=r.cfg.phase_lr.get("finetune", r.hp.lr))  # fmt: skip
        r.run_phase(model, f"domain{d}", 1, ph)
        trained.per_domain[d] = model
    return trained, reference, "Mix"


def train_joint(r: RecipeRun) -> Trained:
    """Backbone and adapters together from scratch, in one phase (``recipes.joint_phase``)."""
    model = r.fresh_model()
    r.run_phase(model, "model", 0, joint_phase(r.cfg, r.hp.lr))
    final_stage(model, r.cfg)
    return TrainedModels(model), None, None


def train_finetune_fresh(r: RecipeRun) -> Trained:
    """The backbone (the reference), then all of it fine-tuned on the fresh rows."""
    model = r.fresh_model()
    (ph,) = plan_phases(model, r.cfg, r.hp)
    r.run_phase(model, "model", 0, ph)
    reference = r.evaluate(model)
    r.run_phase(model, "model", 1, finetune_fresh_phase(r.cfg, r.hp.lr))
    model.set_stage("backbone")
    return TrainedModels(model), reference, "Base (phase 1)"


#: ``Recipe.trainer`` -> how the recipe's phases run
TRAINERS: dict[str, Callable[[RecipeRun], Trained]] = {
    "phased": train_phased,
    "per_domain": train_per_domain,
    "finetune": train_finetune,
    "joint": train_joint,
    "finetune_fresh": train_finetune_fresh,
}


def run_training(
    cfg: TrainConfig,
    ctx: DistContext = SINGLE,
    device: torch.device | None = None,
    prepared: PreparedData | None = None,
) -> RunResult:
    """Train ``cfg``'s method, evaluate it, and write the run folder (rank 0).

    Run folder: ``config.yaml`` (resolved), ``metrics.json``, ``results.md``,
    ``checkpoints/`` (per phase, for ``resume``), ``final/`` (weights for ``mdlora export``)
    and, with ``export``, the artifact(s).
    """
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device or pick_device(cfg.device, ctx)
    seed_everything(cfg.seed)
    prepared = prepared if prepared is not None else load_data(cfg)
    hp = resolve_hparams(cfg, prepared)
    out = cfg.out_dir()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []  # config.yaml: only once a checkpoint check passed (or none was)

    def write_config() -> None:
        if ctx.is_main and not written:
            save_config(cfg, out / "config.yaml")
            written.append(out / "config.yaml")

    train, val, test = (to_batch(prepared.split(s), device) for s in ("train", "val", "test"))
    rows = PhaseRows(cfg, prepared.train, train, prepared.train_order)
    settings = LoopSettings(
        batch_size=hp.batch_size, l2=hp.l2, patience=cfg.patience, seed=cfg.seed,
        amp=cfg.amp, eval_batch_size=cfg.eval_batch_size, progress=cfg.progress,
        eval_every=cfg.eval_every,
    )  # fmt: skip
    ckpt = Checkpoints(out / "checkpoints", cfg.fingerprint(), cfg.resume, ctx.is_main)
    results: list[PhaseResult] = []
    names = prepared.domain_names[prepared.divisions[0]]

    def run_phase(model: MultiDomainModel, tag: str, index: int, ph: Phase) -> None:
        which, rows_batch = rows.for_phase(ph)
        if cfg.progress and ctx.is_main:
            print(f"phase {ph.name}: groups {ph.groups}, up to {ph.epochs} epochs, "
                  f"{which} ({len(rows_batch)} rows)")  # fmt: skip

        def train_it() -> PhaseResult:
            write_config()  # before training, so that an interrupted run keeps its config
            res = train_phase(model, ph, rows_batch, val, settings, ctx, index)
            res.rows = which
            return res

        results.append(ckpt.run(model, tag, index, ph, train_it))
        write_config()  # a resumed phase: its checkpoint was made under this config

    def fresh_model() -> MultiDomainModel:
        torch.manual_seed(cfg.seed)
        return build_model(cfg, prepared, hp).to(device)

    run = RecipeRun(cfg, hp, prepared, test, names, run_phase, fresh_model)
    trained, reference, reference_label = TRAINERS[cfg.recipe.trainer](run)

    for m in trained.models():
        m.eval()
    distributed = {
        "world_size": ctx.world_size,
        "replicas_identical": all(replicas_identical(m, ctx) for m in trained.models()),
    }
    if not distributed["replicas_identical"]:
        print("WARNING: data-parallel replicas ended with different weights")
    result = RunResult(
        config=cfg, prepared=prepared, hparams=hp, trained=trained, phases=results,
        test=evaluate_divisions(trained, test, prepared, cfg.eval_batch_size),
        val=evaluate_divisions(trained, val, prepared, cfg.eval_batch_size),
        reference=reference, reference_label=reference_label, out_dir=out,
        seconds=time.perf_counter() - t_start, distributed=distributed, adapt_rows=rows.info,
    )  # fmt: skip
    if ctx.is_main:
        write_outputs(result)
    barrier(ctx)
    return result


def write_outputs(result: RunResult) -> None:
    """metrics.json, results.md, final/ weights, the artifact(s); print the summary."""
    from mdlora.training.export import export_result, save_final

    out = result.out_dir
    (out / "metrics.json").write_text(json.dumps(result.metrics_dict(), indent=2))
    md = [f"# {result.config.name}: {method_label(result.config)} / {result.config.backbone} "
          f"on {result.prepared.name}", ""]  # fmt: skip
    for table in result.tables().values():
        md.append(markdown_table(table))
    phases = trajectory_table(result.phases)
    md += ["## Phases (validation mean AUC x100; step and epoch of each value)", "", phases]
    (out / "results.md").write_text("\n".join(md))
    save_final(result)
    if result.config.export:
        result.artifacts = export_result(result)
    if result.config.progress:
        for table in result.tables().values():
            print_summary(table, title=f"{result.config.name} test metrics")
        print("phases (validation mean AUC x100):")
        print(phases, end="")
        kept = result.unchanged_phases()
        if kept:
            print(
                f"note: {len(kept)} phase(s) after the first improved no validation AUC and "
                f"kept their starting weights ({', '.join(kept[:6])}"
                f"{', ...' if len(kept) > 6 else ''}); where every one did, the method scores "
                f"exactly like {result.reference_label or 'its starting point'}"
            )
        print(f"run folder: {out}  ({result.seconds:.1f} s)")
