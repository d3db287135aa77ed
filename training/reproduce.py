"""Reproduce the papers' MovieLens tables: the grid, the cell runner, the cache and the report.

``mdlora reproduce`` walks a grid of *cells*. A cell is one method trained on one data setting
with one backbone and one seed; its test metrics are cached as JSON under
``results/reproduce/<table>/<cell-id>.json`` and a cached cell is never run again. The report
(``docs/results.md`` and the PNG plots beside it) is rebuilt from the cache alone.

Tables (ALGORITHMS.md):

* ``table1`` -- MoE-MLoRA's Table 1 on MovieLens-1M: splits gender / age / occupation x the
  eight backbones x Base, MLoRA, MoE-MLoRA, WAUC;
* ``figure2`` -- MoE-MLoRA's Figure 2: gender split, k = 1..4 experts per domain;
* ``multilora`` -- MultiLoRA's Tables 3-5 and 7: the MultiLoRA setting (3 age groups, gender
  auxiliary), Single / Mix / Fine-tune / SingleLoRA / MultiLoRA (+ -add, -avg) with the MLP
  backbone, and Mix / Fine-tune / SingleLoRA / MultiLoRA with WDL, DCN and DeepFM;
* ``add_domain`` -- one occupation held out of training, added afterwards through
  ``training.add_domain.add_domain`` (what ``mdlora add-domain`` runs), compared with the
  backbone alone and with the full retraining (the ``table1`` occupation cells).

Every cell trains through :func:`training.methods.run_training`. Cells of one (data, backbone,
seed) *group* share the phases they have in common -- phase 1, the backbone, is the same
computation for every method, and SingleLoRA / MultiLoRA-add / -avg repeat MultiLoRA's LoRA
phases -- by seeding the run's per-phase checkpoints (``resume``) from the run that trained
them first. Each phase reseeds from the config seed, so a seeded run ends with exactly the
weights of an unshared one (``tests/training/test_reproduce.py`` checks this).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from training.config import TrainConfig
    from training.data.prepared import PreparedData
    from training.methods import RunResult

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "results" / "reproduce"
DEFAULT_WORK = REPO_ROOT / "runs" / "reproduce"
DEFAULT_DOCS = REPO_ROOT / "docs"
DATA_ENV = "MDLORA_DATA_DIR"

TABLES = ("table1", "figure2", "multilora", "add_domain")
TABLE1_SPLITS = ("gender", "age", "occupation")
TABLE1_BACKBONES = ("wdl", "nfm", "autoint", "pnn", "dcn", "fibinet", "deepfm", "xdeepfm")
TABLE1_METHODS = ("base", "mlora", "moe")
FIGURE2_BACKBONES = ("deepfm", "autoint", "nfm")
FIGURE2_EXPERTS = (1, 2, 3, 4)
MULTILORA_SPLIT = "age-groups"
MULTILORA_METHODS_MLP = (
    "base", "single", "finetune", "multilora", "singlelora", "multilora-add", "multilora-avg",
)  # fmt: skip
MULTILORA_METHODS_OTHER = ("base", "finetune", "multilora", "singlelora")
MULTILORA_BACKBONES = ("mlp", "wdl", "dcn", "deepfm")
ADD_DOMAIN_BACKBONES = ("deepfm",)
#: the occupation held out: homemaker, the smallest after farmer (17 users, 2.7k ratings)
HOLDOUT_DOMAIN = "9"
HOLDOUT_NAME = "homemaker"
SEEDS = (1, 2, 3)
ALL_METHODS = (
    "base", "mlora", "moe", "single", "finetune", "singlelora", "multilora", "multilora-add",
    "multilora-avg",
)  # fmt: skip

LABELS = {
    "base": "Base", "mlora": "MLoRA", "moe": "MoE-MLoRA", "single": "Single",
    "finetune": "Fine-tune", "singlelora": "SingleLoRA", "multilora": "MultiLoRA",
    "multilora-add": "MultiLoRA-add", "multilora-avg": "MultiLoRA-avg",
}  # fmt: skip
BACKBONE_LABELS = {
    "wdl": "WDL", "nfm": "NFM", "autoint": "AutoInt", "pnn": "PNN", "dcn": "DCN",
    "fibinet": "FiBiNET", "deepfm": "DeepFM", "xdeepfm": "xDeepFM", "mlp": "MLP",
}  # fmt: skip

# ----------------------------------------------------------------------- paper numbers
#: MoE-MLoRA Table 1, WAUC %: the averages over the eight backbones (ALGORITHMS.md section 4)
PAPER_TABLE1_AVG = {
    "gender": {"base": 80.30, "mlora": 80.42, "moe": 80.28},
    "age": {"base": 80.56, "mlora": 80.62, "moe": 80.53},
    "occupation": {"base": 80.52, "mlora": 80.46, "moe": 80.58},
}
#: per-backbone Table 1 numbers we have (from the training issue)
PAPER_TABLE1_CELLS = {("gender", "deepfm"): {"base": 80.22, "mlora": 80.38, "moe": 80.22}}
#: MultiLoRA, MovieLens total AUC (ALGORITHMS.md section 5)
PAPER_MULTILORA = {
    ("mlp", "single"): 0.7969, ("mlp", "base"): 0.8105, ("mlp", "finetune"): 0.8077,
    ("mlp", "singlelora"): 0.8160, ("mlp", "multilora"): 0.8170,
    ("wdl", "multilora"): 0.8200, ("dcn", "multilora"): 0.8182, ("deepfm", "multilora"): 0.8229,
}  # fmt: skip

# Adapter tensors (never part of phase 1): left out when only the backbone is shared.
ADAPTER_PREFIXES = ("tower.banks.", "tower.lora_sets.", "tower.domain_norms.", "tower.fusions.",
                    "gate.")  # fmt: skip
# MultiLoRA family: how many leading phases each has (backbone, lora:nat, lora:aux) that are
# the same computation in every member.
MULTILORA_PREFIX = {"multilora": 3, "multilora-add": 3, "multilora-avg": 3, "singlelora": 2}


class ReproduceError(RuntimeError):
    """The grid cannot run as asked; the message says what to change."""


# ---------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Slice:
    """A cut of the data and training for quick runs; the full run is ``Slice()``."""

    max_rows: int | None = None
    sample_frac: float | None = None
    epochs: int | None = None  # None: the training default (10, early stopping)

    @property
    def tag(self) -> str:
        parts = []
        if self.max_rows:
            parts.append(f"r{self.max_rows}")
        if self.sample_frac:
            parts.append(f"f{self.sample_frac:g}")
        if self.epochs:
            parts.append(f"e{self.epochs}")
        return "" if not parts else "@" + "-".join(parts)

    @property
    def is_full(self) -> bool:
        return not (self.max_rows or self.sample_frac or self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {"max_rows": self.max_rows, "sample_frac": self.sample_frac, "epochs": self.epochs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Slice:
        return cls(d.get("max_rows"), d.get("sample_frac"), d.get("epochs"))

    def options(self) -> list[str]:
        out = []
        if self.max_rows:
            out.append(f"--max-rows {self.max_rows}")
        if self.sample_frac:
            out.append(f"--sample-frac {self.sample_frac:g}")
        if self.epochs:
            out.append(f"--epochs {self.epochs}")
        return out


@dataclass(frozen=True)
class Cell:
    """One method x data setting x backbone x seed (x experts) of one table."""

    table: str
    split: str  # gender / age / occupation, or MULTILORA_SPLIT
    backbone: str
    method: str  # one of ALL_METHODS
    seed: int
    experts: int = 1  # MoE-MLoRA experts per domain
    slice: Slice = field(default_factory=Slice)

    @property
    def preset(self) -> str:
        return "ml1m-multilora" if self.split == MULTILORA_SPLIT else f"ml1m-mlora-{self.split}"

    @property
    def cell_id(self) -> str:
        if self.table == "add_domain":
            core = f"{self.split}-holdout{HOLDOUT_DOMAIN}-{self.backbone}"
        elif self.table == "multilora":
            core = f"{self.backbone}-{self.method}"
        else:
            core = f"{self.split}-{self.backbone}-{self.method}"
            if self.table == "figure2":
                core += f"-k{self.experts}"
        return f"{core}-s{self.seed}{self.slice.tag}"

    @property
    def key(self) -> tuple[Any, ...]:
        """What determines the trained model: equal keys in two tables are the same run."""
        table = "holdout" if self.table == "add_domain" else "-"
        return (table, self.preset, self.backbone, self.method, self.experts, self.seed,
                self.slice)  # fmt: skip

    @property
    def group(self) -> str:
        """Runs of one group share phase 1 (same data, backbone, seed and slice)."""
        data = self.preset + (f"-holdout{HOLDOUT_DOMAIN}" if self.table == "add_domain" else "")
        return f"{data}-{self.backbone}-s{self.seed}{self.slice.tag}"

    @property
    def run_tag(self) -> str:
        return self.method + (f"-k{self.experts}" if self.method == "moe" else "")

    @property
    def train_method(self) -> str:
        """The ``TrainConfig.method`` (``multilora-add`` trains ``multilora``, fusion add)."""
        return self.method.split("-")[0]

    @property
    def fusion(self) -> str:
        _, _, fusion = self.method.partition("-")
        return fusion or "attention"

    @property
    def label(self) -> str:
        if self.table == "add_domain":
            return f"MLoRA + added domain {HOLDOUT_DOMAIN} ({HOLDOUT_NAME})"
        return LABELS[self.method] + (f" k={self.experts}" if self.table == "figure2" else "")

    def path(self, results_dir: Path) -> Path:
        return Path(results_dir) / self.table / f"{self.cell_id}.json"

    def command(self) -> str:
        parts = ["mdlora reproduce", f"--table {self.table}"]
        if self.table in ("table1", "figure2"):
            parts.append(f"--split {self.split}")
        parts += [f"--backbone {self.backbone}", f"--method {self.method}", f"--seed {self.seed}"]
        return " ".join(parts + self.slice.options())


def _pick(values: Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    if not values:
        return list(allowed)
    flat = [v.strip().lower() for item in values for v in str(item).split(",") if v.strip()]
    return [v for v in flat if v in allowed]


def _check_choices(values: Sequence[str] | None, known: Sequence[str], what: str) -> None:
    for item in values or []:
        for v in str(item).split(","):
            if v.strip() and v.strip().lower() not in known:
                raise ReproduceError(f"unknown {what} {v.strip()!r}; choose from {list(known)}")


def build_grid(
    tables: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    data_slice: Slice | None = None,
) -> list[Cell]:
    """The cells to run, in priority order, filtered by the given choices (None: all).

    Order: per seed, Table 1 gender; MultiLoRA with MLP; add-domain (with the Table 1
    occupation cells it compares with); Figure 2; MultiLoRA's other backbones; Table 1 age;
    Table 1 occupation. Cells with the same training key appear once.
    """
    sl = data_slice or Slice()
    _check_choices(tables, TABLES, "table")
    _check_choices(splits, (*TABLE1_SPLITS, MULTILORA_SPLIT), "split")
    all_backbones = sorted({*TABLE1_BACKBONES, *MULTILORA_BACKBONES})
    _check_choices(backbones, all_backbones, "backbone")
    _check_choices(methods, ALL_METHODS, "method")
    want_tables = _pick(tables, TABLES, "table")
    want_splits = set(_pick(splits, (*TABLE1_SPLITS, MULTILORA_SPLIT), "split"))
    want_bb = set(_pick(backbones, all_backbones, "backbone"))
    want_methods = set(_pick(methods, ALL_METHODS, "method"))
    want_seeds = list(seeds) if seeds else list(SEEDS)

    def t1(split: str, seed: int, bbs: Iterable[str], meths: Iterable[str]) -> list[Cell]:
        return [Cell("table1", split, b, m, seed, slice=sl) for b in bbs for m in meths]

    out: list[Cell] = []
    for seed in want_seeds:
        parts: list[list[Cell]] = []
        if "table1" in want_tables and "gender" in want_splits:
            parts.append(t1("gender", seed, _keep(TABLE1_BACKBONES, want_bb),
                            _keep(TABLE1_METHODS, want_methods)))  # fmt: skip
        if "multilora" in want_tables and MULTILORA_SPLIT in want_splits and "mlp" in want_bb:
            parts.append([Cell("multilora", MULTILORA_SPLIT, "mlp", m, seed, slice=sl)
                          for m in _keep(MULTILORA_METHODS_MLP, want_methods)])  # fmt: skip
        if (
            "add_domain" in want_tables
            and "occupation" in want_splits
            and ("mlora" in want_methods)
        ):
            for b in _keep(ADD_DOMAIN_BACKBONES, want_bb):
                # the full retraining it is compared with: Table 1's occupation cells
                parts.append(t1("occupation", seed, [b], ["base", "mlora"]))
                parts.append([Cell("add_domain", "occupation", b, "mlora", seed, slice=sl)])
        if "figure2" in want_tables and "gender" in want_splits and "moe" in want_methods:
            parts.append([Cell("figure2", "gender", b, "moe", seed, k, sl)
                          for b in _keep(FIGURE2_BACKBONES, want_bb)
                          for k in FIGURE2_EXPERTS])  # fmt: skip
        if "multilora" in want_tables and MULTILORA_SPLIT in want_splits:
            parts.append([Cell("multilora", MULTILORA_SPLIT, b, m, seed, slice=sl)
                          for b in _keep(MULTILORA_BACKBONES[1:], want_bb)
                          for m in _keep(MULTILORA_METHODS_OTHER, want_methods)])  # fmt: skip
        for split in ("age", "occupation"):
            if "table1" in want_tables and split in want_splits:
                parts.append(t1(split, seed, _keep(TABLE1_BACKBONES, want_bb),
                                _keep(TABLE1_METHODS, want_methods)))  # fmt: skip
        for part in parts:
            out += part
    seen: set[tuple[str, str]] = set()
    unique = []
    for c in out:
        if (c.table, c.cell_id) not in seen:
            seen.add((c.table, c.cell_id))
            unique.append(c)
    return unique


def _keep(order: Sequence[str], wanted: set[str]) -> list[str]:
    return [x for x in order if x in wanted]


# ---------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Where things live and how cells run."""

    data_dir: Path
    results_dir: Path = DEFAULT_RESULTS
    work_dir: Path = DEFAULT_WORK
    docs_dir: Path = DEFAULT_DOCS
    device: str = "auto"
    threads: int | None = None
    data_slice: Slice = field(default_factory=Slice)
    verbose: bool = False

    @property
    def ml1m(self) -> Path:
        return Path(self.data_dir) / "ml-1m"


def default_data_dir() -> Path:
    """``$MDLORA_DATA_DIR``, else ``../shared/data`` beside the repository root."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


def check_data(data_dir: Path) -> Path:
    """The ML-1M folder under ``data_dir``; a clear error when it is absent."""
    from training.data.movielens import find_ml1m_ratings

    folder = Path(data_dir) / "ml-1m"
    try:
        find_ml1m_ratings(folder)
    except FileNotFoundError as exc:
        raise ReproduceError(
            f"MovieLens-1M not found under {data_dir} ({exc}); pass --data-dir or set "
            f"{DATA_ENV} to the folder that holds ml-1m/"
        ) from None
    return folder


# ------------------------------------------------------------------------------ data
class DataCache:
    """Raw ML-1M loaded once; prepared settings built once per (preset, slice)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._raw: pd.DataFrame | None = None
        self._prepared: dict[tuple[str, Slice], PreparedData] = {}
        self._holdout: dict[Slice, HoldoutData] = {}

    def raw(self) -> pd.DataFrame:
        if self._raw is None:
            from training.data.movielens import load_movielens_1m

            self._raw = load_movielens_1m(check_data(self.settings.data_dir))
        return self._raw

    def prepared(self, preset: str, sl: Slice) -> PreparedData:
        key = (preset, sl)
        if key not in self._prepared:
            from training.data.presets import prepare_preset

            self._prepared[key] = prepare_preset(preset, self.raw(), **_slice_options(sl))
        return self._prepared[key]

    def holdout(self, sl: Slice) -> HoldoutData:
        if sl not in self._holdout:
            self._holdout[sl] = holdout_setting(self.raw(), HOLDOUT_DOMAIN, sl)
        return self._holdout[sl]


def _slice_options(sl: Slice) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if sl.max_rows:
        opts["max_rows"] = sl.max_rows
    if sl.sample_frac:
        opts["sample_frac"] = sl.sample_frac
    return opts


@dataclass
class HoldoutData:
    """The occupation setting without one domain, and that domain's rows kept aside.

    The split is the full setting's (same seed), so the other domains' rows, and the held-out
    domain's test rows, are exactly those of the Table 1 occupation cells.
    """

    prepared: PreparedData
    domain: str
    fit_rows: pd.DataFrame  # the held-out domain's train + validation rows, raw, with label
    test_rows: pd.DataFrame  # its test rows, raw, with label


def holdout_setting(raw: pd.DataFrame, domain: str, sl: Slice) -> HoldoutData:
    """MovieLens-1M MLoRA occupation setting with ``domain`` removed from training."""
    import numpy as np
    import pandas as pd

    from mdlora.encoder import FeatureEncoder
    from training.data.prepared import PreparedData, encode_splits
    from training.data.presets import MLORA_DIVISIONS, MLORA_HPARAMS
    from training.data.splits import stratified_domain_split, subsample

    division = "occupation"
    seed = 2024  # the presets' data seed (fixed, as in the papers)
    rows = subsample(raw, sl.max_rows, sl.sample_frac, seed)
    df = rows[["user_id", "movie_id", division]].reset_index(drop=True)
    labels = (rows["rating"].to_numpy() == 5).astype(np.float32)
    names = MLORA_DIVISIONS[division]
    dom = pd.Index(names).get_indexer(pd.Index(df[division].astype(str)))
    splits = stratified_domain_split(dom, labels, MLORA_HPARAMS["split"], seed)
    held = names.index(domain)
    keep = [idx[dom[idx] != held] for idx in splits]
    aside = [idx[dom[idx] == held] for idx in splits]
    others = [n for n in names if n != domain]
    encoder = FeatureEncoder(
        sparse=["user_id", "movie_id", division], divisions=[division],
        domain_order={division: others},
    )  # fmt: skip
    train, val, test = encode_splits(df, encoder, labels, keep)
    prepared = PreparedData(
        name=f"ml1m-mlora-occupation-without-{domain}", encoder=encoder, train=train, val=val,
        test=test, divisions=[division], domain_names={division: others},
        hparams=dict(MLORA_HPARAMS),
        info={"label": "rating == 5", "domain_field": division, "seed": seed,
              "held_out": domain},
    )  # fmt: skip
    labelled = df.assign(label=labels.astype(np.int64))
    fit_rows = labelled.iloc[np.concatenate([aside[0], aside[1]])].reset_index(drop=True)
    test_rows = labelled.iloc[aside[2]].reset_index(drop=True)
    return HoldoutData(prepared, domain, fit_rows, test_rows)


# ------------------------------------------------------------------------ cell runner
def train_config(cell: Cell, settings: Settings, out: Path) -> TrainConfig:
    """The :class:`TrainConfig` of one cell (the experiment as ``mdlora train`` would run it)."""
    from training.config import DataConfig, TrainConfig

    sl = cell.slice
    data = DataConfig(source="preset", preset=cell.preset, path=str(settings.ml1m),
                      options=_slice_options(sl))  # fmt: skip
    return TrainConfig(
        name=f"{cell.table}-{cell.cell_id}", data=data, method=cell.train_method,
        backbone=cell.backbone, experts_per_domain=cell.experts, fusion=cell.fusion,
        epochs=sl.epochs or 10, seed=cell.seed, device=settings.device,
        threads=settings.threads, progress=settings.verbose, out=str(out),
        export=cell.table == "add_domain", onnx=False, resume=True,
    )  # fmt: skip


def _checkpoint_paths(run_dir: Path, fingerprint: str, index: int, phase: str) -> tuple[Path, Path]:
    from training.methods import Checkpoints

    return Checkpoints(run_dir / "checkpoints", fingerprint, True, True).paths(
        "model", index, phase
    )


def _phase_names(method: str, cfg_divisions: Sequence[str]) -> list[str]:
    if method in MULTILORA_PREFIX:
        nat, aux = cfg_divisions[0], cfg_divisions[1]
        return ["backbone", f"lora:{nat}", f"lora:{aux}"][: MULTILORA_PREFIX[method]]
    return ["backbone"]


def shareable_phases(target: str, donor: str) -> int:
    """Leading phases ``target`` can take from a finished ``donor`` run of the same group."""
    if "single" in (target, donor):
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

    from training.methods import build_model, resolve_hparams, state_dict_cpu

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
    from models.freeze import phase_parameter_counts

    models = result.trained.models()
    return phase_parameter_counts(models[0]) if models else {}


def _device_name(settings: Settings) -> str:
    import torch

    from training.distributed import pick_device

    dev = pick_device(settings.device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {platform.node()})"


def run_method(
    cell: Cell, settings: Settings, prepared: PreparedData
) -> tuple[RunResult, dict[str, Any]]:
    """Train ``cell``'s method through :func:`run_training`, sharing phases within its group."""
    from training.methods import run_training

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

    from mdlora.artifact import load_artifact
    from mdlora.encoder import FeatureEncoder
    from mdlora.grown import place
    from training.add_domain import AddDomainSettings, add_domain
    from training.evaluate import compute_metrics
    from training.loop import predict, to_batch

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
    from training.distributed import pick_device

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


# ------------------------------------------------------------------------------ cache
def read_cell(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


def write_cell(path: Path, record: dict[str, Any]) -> None:
    """Write a cell's JSON atomically (a crash never leaves half a cached cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_cache(results_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        rec = read_cell(path)
        if rec is not None and "table" in rec:
            out.append(rec)
    return out


def _alias(cell: Cell, results_dir: Path) -> dict[str, Any] | None:
    """A cached cell of another table with the same training key (e.g. Figure 2's k=1)."""
    if cell.table == "figure2" and cell.experts == 1:
        twin = Cell("table1", cell.split, cell.backbone, cell.method, cell.seed, 1, cell.slice)
        rec = read_cell(twin.path(results_dir))
        if rec is not None:
            return {**rec, "table": cell.table, "cell": cell.cell_id, "label": cell.label,
                    "same_run_as": f"table1/{twin.cell_id}"}  # fmt: skip
    return None


# ------------------------------------------------------------------------------- grid
def estimate_seconds(cell: Cell, done: list[dict[str, Any]]) -> float:
    """A cell's expected duration from finished cells like it (same table, method, split)."""

    def mean_of(pred: Callable[[dict[str, Any]], bool]) -> float | None:
        xs = [r["seconds"] for r in done if pred(r) and not r.get("same_run_as")]
        return statistics.fmean(xs) if xs else None

    for pred in (
        lambda r: (
            (r["table"], r["method"], r["split"], r["backbone"])
            == (cell.table, cell.method, cell.split, cell.backbone)
        ),
        lambda r: (r["table"], r["method"], r["split"]) == (cell.table, cell.method, cell.split),
        lambda r: (r["table"], r["method"]) == (cell.table, cell.method),
        lambda r: r["table"] == cell.table,
        lambda r: True,
    ):
        m = mean_of(pred)
        if m is not None:
            return m
    return 120.0


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class GroupLock:
    """A lock file per group, so several ``mdlora reproduce`` processes can share one grid.

    Each worker runs only cells whose group no other live process holds; a lock left by a
    dead process is taken over.
    """

    def __init__(self, work_dir: Path, group: str) -> None:
        self.path = Path(work_dir) / f"{group}.lock"

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {platform.node()}")
            return True
        return False

    def _holder_alive(self) -> bool:
        try:
            pid_text, _, host = self.path.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return False
        if host and host != platform.node():
            return True  # another machine's process: cannot check, assume alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def run_grid(
    cells: list[Cell],
    settings: Settings,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell not yet cached (progress bar with an ETA); returns the new records.

    Cells whose group another ``mdlora reproduce`` process is working on are deferred and
    retried after the others; they are left to that process if it still holds them at the end.
    """
    from tqdm.auto import tqdm

    results_dir = Path(settings.results_dir)
    todo = [c for c in cells if not c.path(results_dir).is_file()]
    skipped = len(cells) - len(todo)
    if skipped:
        print(f"{skipped} of {len(cells)} cells already cached in {results_dir}: skipped")
    if not todo:
        return []
    check_data(settings.data_dir)
    data = DataCache(settings)
    done = load_cache(results_dir)
    new: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="reproduce", unit="cell", dynamic_ncols=True, smoothing=0)
    pending = list(todo)
    while pending:
        deferred: list[Cell] = []
        progressed = False
        for cell in pending:
            if cell.path(results_dir).is_file():
                bar.update(1)  # finished by another process meanwhile
                progressed = True
                continue
            lock = GroupLock(settings.work_dir, cell.group)
            if not lock.acquire():
                deferred.append(cell)
                continue
            try:
                if cell.path(results_dir).is_file():
                    bar.update(1)
                    progressed = True
                    continue
                rest = [c for c in pending if not c.path(results_dir).is_file()]
                eta = sum(estimate_seconds(c, done) for c in rest)
                bar.set_postfix_str(f"{cell.table}/{cell.cell_id}, ETA ~{_hms(eta)}")
                record = _alias(cell, results_dir)
                if record is None:
                    record = run_cell(cell, settings, data)
                write_cell(cell.path(results_dir), record)
            finally:
                lock.release()
            progressed = True
            done.append(record)
            new.append(record)
            bar.update(1)
            tqdm.write(_cell_line(cell, record))
            if on_cell is not None:
                on_cell(cell, record)
        if deferred and not progressed:
            names = sorted({c.group for c in deferred})
            tqdm.write(f"{len(deferred)} cell(s) left to the other process(es) holding {names}")
            break
        pending = deferred
    bar.close()
    return new


def _cell_line(cell: Cell, record: dict[str, Any]) -> str:
    wauc = record.get("wauc")
    shown = "n/a" if wauc is None else f"{100 * wauc:.2f}"
    how = f"same run as {record['same_run_as']}" if record.get("same_run_as") else (
        f"{record['seconds']:.0f} s"
        + (f", shared {','.join(record['shared_phases'])}" if record.get("shared_phases") else "")
    )  # fmt: skip
    return f"[{time.strftime('%H:%M:%S')}] {cell.table}/{cell.cell_id}: WAUC {shown} ({how})"


# ------------------------------------------------------------------------ aggregation
@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (std None with one seed)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def fmt(self, scale: float = 100.0, digits: int = 2) -> str:
        if not self.values:
            return "not run"
        m = self.mean
        assert m is not None
        s = f"{scale * m:.{digits}f}"
        if self.std is not None:
            s += f" ± {scale * self.std:.{digits}f}"
        return s + ("" if self.n >= 3 else f" (n={self.n})")


def _select(records: Iterable[dict[str, Any]], sl: Slice, **match: Any) -> list[dict[str, Any]]:
    out = []
    for r in records:
        if Slice.from_dict(r.get("slice", {})) != sl:
            continue
        if all(r.get(k) == v for k, v in match.items()):
            out.append(r)
    return out


def _wauc_of(rec: dict[str, Any], method: str) -> float | None:
    """WAUC of ``method`` from a cell record (Base may come from another method's phase 1)."""
    if rec["method"] == method:
        w = rec.get("wauc")
        return None if w is None else float(w)
    return None


def table1_stats(records: list[dict[str, Any]], sl: Slice) -> dict[tuple[str, str, str], Stat]:
    """(split, backbone, method) -> WAUC over seeds."""
    stats: dict[tuple[str, str, str], Stat] = defaultdict(lambda: Stat([]))
    for r in _select(records, sl, table="table1"):
        w = _wauc_of(r, r["method"])
        if w is not None:
            stats[(r["split"], r["backbone"], r["method"])].values.append(w)
    return stats


def significant(a: Stat, b: Stat) -> bool | None:
    """Whether two methods differ by more than the seed noise (None: fewer than 2 seeds).

    The rule: |mean difference| > the larger of the two standard deviations; a rough screen,
    stated in the report, not a formal test (3 seeds are too few for one).
    """
    if a.std is None or b.std is None or a.mean is None or b.mean is None:
        return None
    return abs(a.mean - b.mean) > max(a.std, b.std)


# ------------------------------------------------------------------------------ report
def _pp(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _status(expected: list[Cell], results_dir: Path) -> tuple[list[Cell], list[Cell]]:
    have = [c for c in expected if c.path(results_dir).is_file()]
    missing = [c for c in expected if not c.path(results_dir).is_file()]
    return have, missing


def _commands(missing: list[Cell]) -> list[str]:
    """Compact commands that run the missing cells: one per (table, split, seed)."""
    grouped: dict[tuple[str, str, int, Slice], set[str]] = defaultdict(set)
    for c in missing:
        grouped[(c.table, c.split, c.seed, c.slice)].add(c.backbone)
    every = {
        "table1": set(TABLE1_BACKBONES), "figure2": set(FIGURE2_BACKBONES),
        "multilora": set(MULTILORA_BACKBONES), "add_domain": set(ADD_DOMAIN_BACKBONES),
    }  # fmt: skip
    out = []
    for (table, split, seed, sl), bbs in grouped.items():
        parts = ["mdlora reproduce", f"--table {table}"]
        if table != "multilora":
            parts.append(f"--split {split}")
        if bbs != every[table]:
            parts.append("--backbone " + ",".join(sorted(bbs)))
        parts += [f"--seed {seed}", *sl.options()]
        out.append(" ".join(parts))
    return out


def _time_lines(records: list[dict[str, Any]], table: str, missing: list[Cell]) -> list[str]:
    recs = [r for r in records if r["table"] == table and not r.get("same_run_as")]
    spent = sum(r["seconds"] for r in recs)
    devices = sorted({r.get("device", "?").split(" (")[0] for r in recs})
    left = sum(estimate_seconds(c, records) for c in missing)
    line = f"Time: {len(recs)} cell(s) ran in {_hms(spent)} in total on {', '.join(devices) or '—'}"
    if missing:
        line += f"; the {len(missing)} cells not run would take about {_hms(left)} more"
        line += (" (estimated from the finished cells' durations, for one process; processes "
                 "run side by side share it)")  # fmt: skip
    return [line + ".", ""]


def _not_run_block(missing: list[Cell]) -> list[str]:
    if not missing:
        return []
    lines = ["Not run yet; these commands run the missing cells (resumable, cached per cell):", "",
             "```"]  # fmt: skip
    lines += _commands(missing)
    return [*lines, "```", ""]


def report_table1(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    stats = table1_stats(records, sl)
    expected = build_grid(["table1"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    out = ["## MoE-MLoRA Table 1: MovieLens-1M, WAUC %", ""]
    out += [
        "Base / MLoRA / MoE-MLoRA per backbone, mean ± standard deviation over the seeds run "
        "(n < 3 is marked). Base is the phase-1 backbone, shared with MLoRA and MoE-MLoRA "
        "(the same computation, trained once per backbone and seed). The paper reports one "
        "run per cell; its per-backbone numbers are quoted in ALGORITHMS.md only for DeepFM on "
        "gender (80.22 / 80.38 / 80.22), so the other rows are compared through the average.",
        "",
    ]
    for split in TABLE1_SPLITS:
        out += [f"### ML-{split}", ""]
        out.append("| backbone | Base | MLoRA | MoE-MLoRA | MLoRA − Base | MoE − Base | "
                   "paper (B / M / MoE) | note |")  # fmt: skip
        out.append("|---|---:|---:|---:|---:|---:|---|---|")
        col_means: dict[str, list[float]] = defaultdict(list)
        for bb in TABLE1_BACKBONES:
            s = {m: stats.get((split, bb, m), Stat([])) for m in TABLE1_METHODS}
            if all(s[m].mean is not None for m in TABLE1_METHODS):  # complete rows only
                for m in TABLE1_METHODS:
                    col_means[m].append(100 * (s[m].mean or 0.0))
            d_ml = _diff(s["mlora"], s["base"])
            d_moe = _diff(s["moe"], s["base"])
            paper = PAPER_TABLE1_CELLS.get((split, bb))
            ptxt = "—" if paper is None else " / ".join(f"{paper[m]:.2f}" for m in TABLE1_METHODS)
            if paper is not None:
                ours = {m: s[m].mean for m in TABLE1_METHODS}
                diffs = [
                    _pp(None if (v := ours[m]) is None else 100 * v - paper[m])
                    for m in TABLE1_METHODS
                ]
                ptxt += f" (ours − paper: {' / '.join(diffs)})"
            note = _noise_note(s)
            out.append(
                f"| {BACKBONE_LABELS[bb]} | {s['base'].fmt()} | {s['mlora'].fmt()} | "
                f"{s['moe'].fmt()} | {_pp(d_ml)} | {_pp(d_moe)} | {ptxt} | {note} |"
            )
        paper_avg = PAPER_TABLE1_AVG[split]
        full = all(len(col_means[m]) == len(TABLE1_BACKBONES) for m in TABLE1_METHODS)
        avg = {m: statistics.fmean(v) if v else None for m, v in col_means.items()}
        cells = [
            "—" if (v := avg.get(m)) is None else f"{v:.2f}" + ("" if full else "*")
            for m in TABLE1_METHODS
        ]
        pavg = " / ".join(f"{paper_avg[m]:.2f}" for m in TABLE1_METHODS)
        avg_diffs = " / ".join(
            _pp(None if (v := avg.get(m)) is None else v - paper_avg[m]) for m in TABLE1_METHODS
        )
        out.append(
            f"| **average** | {cells[0]} | {cells[1]} | {cells[2]} | | | {pavg} "
            f"(ours − paper: {avg_diffs}) | |"
        )
        if not full:
            n_rows = len(col_means["base"])
            out += ["", f"\\* average over the {n_rows} backbone(s) with all three methods "
                    "run so far, not all eight."]  # fmt: skip
        out.append("")
        plot = plot_table1(stats, split, docs_dir)
        if plot is not None:
            out += [f"![Table 1, ML-{split}]({plot.name})", ""]
    out += _time_lines(records, "table1", missing)
    out += _not_run_block(missing)
    return out


def _diff(a: Stat, b: Stat) -> float | None:
    if a.mean is None or b.mean is None:
        return None
    return 100 * (a.mean - b.mean)


def _noise_note(s: dict[str, Stat]) -> str:
    notes = []
    for m in ("mlora", "moe"):
        sig = significant(s[m], s["base"])
        if sig is False:
            notes.append(f"{LABELS[m]} vs Base within seed noise")
    if s["mlora"].n and s["moe"].n and significant(s["mlora"], s["moe"]) is False:
        notes.append("MLoRA vs MoE within noise")
    if not notes and s["base"].n == 1:
        return "1 seed: noise unknown"
    return "; ".join(notes)


def report_figure2(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    expected = build_grid(["figure2"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    stats: dict[tuple[str, int], Stat] = defaultdict(lambda: Stat([]))
    for r in _select(records, sl, table="figure2"):
        if r.get("wauc") is not None:
            stats[(r["backbone"], int(r["experts_per_domain"]))].values.append(float(r["wauc"]))
    out = ["## MoE-MLoRA Figure 2: number of experts, ML-gender, WAUC %", ""]
    out += ["Total experts = 2 × k (k experts per domain). k = 1 is the Table 1 MoE-MLoRA cell. "
            "The paper shows this as a plot only (no numbers in ALGORITHMS.md).", ""]  # fmt: skip
    out.append("| backbone | " + " | ".join(f"{2 * k} experts" for k in FIGURE2_EXPERTS) + " |")
    out.append("|---|" + "---:|" * len(FIGURE2_EXPERTS))
    for bb in FIGURE2_BACKBONES:
        row = [stats.get((bb, k), Stat([])).fmt() for k in FIGURE2_EXPERTS]
        out.append(f"| {BACKBONE_LABELS[bb]} | " + " | ".join(row) + " |")
    out.append("")
    plot = plot_figure2(stats, docs_dir)
    if plot is not None:
        out += [f"![Figure 2]({plot.name})", ""]
    out += _time_lines(records, "figure2", missing)
    out += _not_run_block(missing)
    return out


def report_multilora(
    records: list[dict[str, Any]], sl: Slice, results_dir: Path, docs_dir: Path
) -> list[str]:
    expected = build_grid(["multilora"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    recs = _select(records, sl, table="multilora")
    out = ["## MultiLoRA Tables 3-5 and 7: MovieLens-1M, 3 age groups (gender auxiliary)", ""]
    out += [
        "Per-domain AUC and LogLoss on the natural division (age groups 1-18, 25, 35-56), "
        "total AUC and LogLoss over all test rows; mean ± std over seeds. Mix is the Base "
        "backbone (phase 1, shared by Fine-tune and the LoRA methods). Paper: total AUC.",
        "",
    ]
    domains = ["1-18", "25", "35-56"]
    for bb in MULTILORA_BACKBONES:
        methods = MULTILORA_METHODS_MLP if bb == "mlp" else MULTILORA_METHODS_OTHER
        out += [f"### {BACKBONE_LABELS[bb]} backbone", ""]
        head = " | ".join(f"AUC {d}" for d in domains)
        lhead = " | ".join(f"LogLoss {d}" for d in domains)
        out.append(f"| method | {head} | total AUC | {lhead} | total LogLoss | paper total AUC "
                   "| ours − paper |")  # fmt: skip
        out.append("|---|" + "---:|" * (2 * len(domains) + 4))
        for m in methods:
            rs = [r for r in recs if r["backbone"] == bb and r["method"] == m]
            per = [Stat([]) for _ in domains]
            lper = [Stat([]) for _ in domains]
            tot, ltot = Stat([]), Stat([])
            for r in rs:
                t = r["test"]["age_group"]
                for i, dm in enumerate(t["domains"]):
                    if dm["auc"] is not None:
                        per[i].values.append(dm["auc"])
                    if dm["logloss"] is not None:
                        lper[i].values.append(dm["logloss"])
                if t["auc"] is not None:
                    tot.values.append(t["auc"])
                if t["logloss"] is not None:
                    ltot.values.append(t["logloss"])
            paper = PAPER_MULTILORA.get((bb, m))
            ptxt = "—" if paper is None else f"{paper:.4f}"
            diff = "—" if paper is None or tot.mean is None else f"{tot.mean - paper:+.4f}"
            cells = [s.fmt(1.0, 4) for s in per] + [tot.fmt(1.0, 4)]
            cells += [s.fmt(1.0, 4) for s in lper] + [ltot.fmt(1.0, 4)]
            name = "Mix (Base)" if m == "base" else LABELS[m]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {ptxt} | {diff} |")
        out.append("")
    out += _param_table(recs)
    plot = plot_multilora(recs, docs_dir)
    if plot is not None:
        out += [f"![MultiLoRA total AUC]({plot.name})", ""]
    out += _time_lines(records, "multilora", missing)
    out += _not_run_block(missing)
    return out


def _param_table(recs: list[dict[str, Any]]) -> list[str]:
    """Table 7: trainable parameters per phase (models.freeze.phase_parameter_counts)."""
    rows = []
    for bb in MULTILORA_BACKBONES:
        r = next((r for r in recs if r["backbone"] == bb and r["method"] == "multilora"
                  and r.get("param_counts")), None)  # fmt: skip
        if r is None:
            continue
        pc = r["param_counts"]
        backbone = pc.get("backbone", 0)
        lora = [v for k, v in pc.items() if k.startswith("lora:")]
        fusion = pc.get("fusion", 0)
        n_dom = 3
        one = lora[0] if lora else 0
        rows.append(
            f"| {BACKBONE_LABELS[bb]} | {backbone:,} | {n_dom * backbone:,} | "
            f"{one:,} ({100 * one / backbone:.1f}%) | {one // n_dom:,} "
            f"({100 * one / n_dom / backbone:.1f}%) | {sum(lora):,} | {fusion:,} | "
            f"{sum(lora) + fusion:,} ({100 * (sum(lora) + fusion) / backbone:.1f}%) |"
        )
    if not rows:
        return ["Trainable parameters (Table 7): not run yet.", ""]
    return [
        "Trainable parameters (the paper's Table 7; counts from "
        "`models.freeze.phase_parameter_counts`, a LoRA set includes its domain norms). "
        "Single and Fine-tune train a whole backbone per domain. The paper reports one LoRA "
        "set at about 2% of the backbone; ours is larger relative to a backbone whose "
        "embedding tables hold most of its weights (ML-1M's id vocabularies at dimension 16), "
        "and the LoRA count here includes the set's per-domain norms and row scales.",
        "",
        "| backbone | backbone | Single / Fine-tune (3 domains) | one LoRA set (natural) "
        "| one domain's LoRA | both LoRA sets | fusion + cell norms | MultiLoRA total added |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def report_add_domain(records: list[dict[str, Any]], sl: Slice, results_dir: Path) -> list[str]:
    expected = build_grid(["add_domain"], data_slice=sl)
    _, missing = _status(expected, results_dir)
    out = [f"## Adding a domain without retraining: occupation {HOLDOUT_DOMAIN} "
           f"({HOLDOUT_NAME})", ""]  # fmt: skip
    out += [
        f"Occupation {HOLDOUT_DOMAIN} ({HOLDOUT_NAME}: 92 users, 11,345 ratings, the smallest "
        "occupation after farmer's 17 users) is held out; MLoRA is trained on the other 20 "
        "with the Table 1 setting and split, exported, and the domain is added through "
        "`training.add_domain.add_domain` (what `mdlora add-domain` runs) on its training and "
        "validation rows. Its users appear in no other occupation, so their ids (and the "
        "occupation's own value of the domain field) are unknown to the model that never saw "
        "the domain: `add-domain` grows embedding rows for them and trains them with the "
        "domain's adapter, everything else frozen (before it did, the adapter alone reached "
        "65.33 ± 0.23 here: with every user out of vocabulary it could only shift the movies' "
        "scores). The test rows are the same as in the Table 1 occupation cells, whose "
        "per-domain AUC of this occupation is the full retraining.",
        "",
    ]
    rows = []
    for bb in ADD_DOMAIN_BACKBONES:
        adds = _select(records, sl, table="add_domain", backbone=bb)
        base_full = Stat([])
        mlora_full = Stat([])
        for method, stat in (("base", base_full), ("mlora", mlora_full)):
            for r in _select(records, sl, table="table1", split="occupation", backbone=bb,
                             method=method):  # fmt: skip
                dm = next(d for d in r["test"]["occupation"]["domains"]
                          if d["domain"] == HOLDOUT_DOMAIN)  # fmt: skip
                if dm["auc"] is not None:
                    stat.values.append(dm["auc"])
        alone = Stat([r["test_new_domain"]["backbone"]["auc"] for r in adds])
        added = Stat([r["test_new_domain"]["added"]["auc"] for r in adds])
        unchanged = all(r.get("others_unchanged") for r in adds) if adds else None
        secs = Stat([r["add_domain"]["seconds"] for r in adds])
        grown = sorted(
            {f"{k} {v}" for r in adds for k, v in r["add_domain"].get("grown", {}).items()}
        )
        rows.append(
            f"| {BACKBONE_LABELS[bb]} | {alone.fmt()} | {added.fmt()} | {base_full.fmt()} | "
            f"{mlora_full.fmt()} | {'—' if secs.mean is None else f'{secs.mean:.0f} s'} | "
            f"{'—' if unchanged is None else ('yes' if unchanged else 'NO')} | "
            f"{', '.join(grown) or 'none'} |"
        )
    out += [
        f"Test AUC % of occupation {HOLDOUT_DOMAIN}:",
        "",
        "| backbone | grown rows, no adapter | grown rows + added adapter | full retraining: "
        "Base | full retraining: MLoRA | add-domain time | other domains' scores unchanged | "
        "ids grown |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
    ]
    out += _time_lines(records, "add_domain", missing)
    out += _not_run_block(missing)
    return out


def location_options(settings: Settings) -> list[str]:
    """The command-line options that put a run's folders, data and threads where
    ``settings`` has them (none for the defaults)."""
    out = []
    for flag, value, default in (
        ("--data-dir", settings.data_dir, default_data_dir()),
        ("--results-dir", settings.results_dir, DEFAULT_RESULTS),
        ("--work-dir", settings.work_dir, DEFAULT_WORK),
        ("--docs-dir", settings.docs_dir, DEFAULT_DOCS),
    ):
        if Path(value).resolve() != Path(default).resolve():
            out.append(f"{flag} {shlex.quote(str(value))}")
    if settings.threads:
        out.append(f"--threads {settings.threads}")
    if settings.device != "auto":
        out.append(f"--device {settings.device}")
    return out


def write_report(settings: Settings, data_slice: Slice | None = None) -> Path:
    """Rebuild ``docs/results.md`` and the plots from the cached cells alone."""
    sl = data_slice if data_slice is not None else settings.data_slice
    results_dir, docs_dir = Path(settings.results_dir), Path(settings.docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    records = load_cache(results_dir)
    n_used = len(_select(records, sl))
    rel = _rel(results_dir)
    lines = [
        "# Reproducing the papers' MovieLens tables",
        "",
        f"Generated by `mdlora reproduce --report-only{' ' + ' '.join(sl.options()) if sl.options() else ''}` "  # noqa: E501
        f"from {n_used} cached cells in `{rel}/` "
        f"(last update {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Numbers are "
        'never typed in by hand: a cell that has not run shows "not run" with the command '
        "that runs it. `mdlora reproduce` (no options) runs everything still missing, most "
        "important first; it is resumable, and `--device cuda` runs the same grid on a GPU.",
        "",
    ]
    if not sl.is_full:
        lines += [
            f"**This report covers a slice of the data/training ({sl.tag[1:]}), not the "
            "papers' setting: its numbers are not comparable with the papers'.**",
            "",
        ]
    lines += summary_section(records, sl)
    lines += _setup_section(_select(records, sl))
    lines += report_table1(records, sl, results_dir, docs_dir)
    lines += report_figure2(records, sl, results_dir, docs_dir)
    lines += report_multilora(records, sl, results_dir, docs_dir)
    lines += report_add_domain(records, sl, results_dir)
    lines += amazon_section(Path(settings.results_dir).parent / "amazon")
    lines += _discussion(records, sl, results_dir)
    loc = location_options(settings)
    if loc:  # the commands shown must write where this run writes, not into the repository
        lines = [f"{ln} {' '.join(loc)}" if ln.startswith("mdlora reproduce") else ln
                 for ln in lines]  # fmt: skip
        i = next(i for i, ln in enumerate(lines) if ln.startswith("Generated by"))
        lines[i] = lines[i].replace("--report-only", "--report-only " + " ".join(loc), 1)
    path = docs_dir / "results.md"
    tmp = path.with_name(f".results.md.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path


def amazon_section(amazon_results: Path) -> list[str]:
    """The real-data cells of ``mdlora reproduce-amazon`` (``training.amazon``), if any ran."""
    if not any(amazon_results.glob("*.json")):
        return []
    from training.amazon import report as amazon_report

    return [amazon_report(amazon_results), ""]


def summary_section(records: list[dict[str, Any]], sl: Slice) -> list[str]:
    """Headline findings and time spent, computed from the cache (nothing typed by hand)."""
    out = ["## Summary", ""]
    stats = table1_stats(records, sl)
    for split in TABLE1_SPLITS:
        bbs = [b for b in TABLE1_BACKBONES
               if all((split, b, m) in stats for m in TABLE1_METHODS)]  # fmt: skip
        if not bbs:
            started = sorted({b for (sp, b, _) in stats if sp == split})
            if started:
                out.append(f"* **Table 1, ML-{split}**: no backbone has all three methods yet "
                           f"(cells finished for {', '.join(BACKBONE_LABELS[b] for b in started)}"
                           "; see the table).")  # fmt: skip
            continue
        avg = {m: statistics.fmean(100 * (stats[(split, b, m)].mean or 0) for b in bbs)
               for m in TABLE1_METHODS}  # fmt: skip
        paper = PAPER_TABLE1_AVG[split]
        wins = sum((stats[(split, b, "mlora")].mean or 0) > (stats[(split, b, "base")].mean or 0)
                   for b in bbs)  # fmt: skip
        moe_wins = sum((stats[(split, b, "moe")].mean or 0) > (stats[(split, b, "base")].mean or 0)
                       for b in bbs)  # fmt: skip
        seeds = sorted({len(stats[(split, b, "base")].values) for b in bbs})
        noisy = [
            b
            for b in bbs
            if significant(stats[(split, b, "mlora")], stats[(split, b, "base")]) is False
        ]
        sig_txt = (
            f"; MLoRA − Base is within seed noise for {len(noisy)} of them"
            if any(n > 1 for n in seeds)
            else "; one seed so far, so no noise estimate"
        )
        unchanged = {
            m: sum(
                1 for r in _select(records, sl, table="table1", split=split, method=m)
                if r["backbone"] in bbs and _adapters_never_improved(r)
            )
            for m in ("mlora", "moe")
        }  # fmt: skip
        n_runs = {m: len(_select(records, sl, table="table1", split=split, method=m))
                  for m in ("mlora", "moe")}  # fmt: skip
        if unchanged["mlora"] or unchanged["moe"]:
            sig_txt += (
                f". {unchanged['mlora']} of {n_runs['mlora']} MLoRA and {unchanged['moe']} of "
                f"{n_runs['moe']} MoE-MLoRA runs end exactly at the Base model: none of their "
                "adapter phases beat the backbone's validation AUC in any epoch, so early "
                "stopping restored the starting point"
            )
        out.append(
            f"* **Table 1, ML-{split}** ({len(bbs)} of 8 backbones, {'/'.join(map(str, seeds))} "
            f"seed(s)): average WAUC Base {avg['base']:.2f} / MLoRA {avg['mlora']:.2f} / "
            f"MoE-MLoRA {avg['moe']:.2f}, paper {paper['base']:.2f} / {paper['mlora']:.2f} / "
            f"{paper['moe']:.2f} (the paper's average is over all eight). MLoRA beats Base on "
            f"{wins} of {len(bbs)} backbones, MoE-MLoRA on {moe_wins}{sig_txt}."
        )
    ml = _select(records, sl, table="multilora", backbone="mlp")
    if ml:
        parts = []
        for m in MULTILORA_METHODS_MLP:
            vals = [r["test"]["age_group"]["auc"] for r in ml if r["method"] == m]
            if vals:
                p = PAPER_MULTILORA.get(("mlp", m))
                parts.append(f"{'Mix' if m == 'base' else LABELS[m]} {statistics.fmean(vals):.4f}"
                             + ("" if p is None else f" (paper {p:.4f})"))  # fmt: skip
        out.append("* **MultiLoRA setting, MLP**, total test AUC: " + ", ".join(parts) + ".")
    adds = _select(records, sl, table="add_domain")
    if adds:
        alone = statistics.fmean(r["test_new_domain"]["backbone"]["auc"] for r in adds)
        added = statistics.fmean(r["test_new_domain"]["added"]["auc"] for r in adds)
        runs = {(a["backbone"], a["seed"]) for a in adds}
        full = [
            _domain_auc(r, "occupation", HOLDOUT_DOMAIN)
            for r in _select(records, sl, table="table1", split="occupation", method="mlora")
            if (r["backbone"], r["seed"]) in runs
        ]
        txt = (f"* **Adding occupation {HOLDOUT_DOMAIN} ({HOLDOUT_NAME}) afterwards**: its test "
               f"AUC goes from {100 * alone:.2f} (its grown rows, no adapter) to "
               f"{100 * added:.2f} with the added adapter and its rows")  # fmt: skip
        if full:
            txt += f"; a full MLoRA retraining that saw it gets {100 * statistics.fmean(full):.2f}"
        out.append(txt + ".")
    if len(out) == 2:
        out.append("* No cell has finished yet.")
    out.append("")
    out += ["Time spent on this machine, from the cached cell durations:", "",
            "| part | cells done | time spent | cells not run | estimated time for them |",
            "|---|---:|---:|---:|---:|"]  # fmt: skip
    total_spent = total_left = 0.0
    for table in TABLES:
        expected = [c for c in build_grid([table], data_slice=sl) if c.table == table]
        recs = [r for r in _select(records, sl, table=table) if not r.get("same_run_as")]
        done_ids = {r["cell"] for r in _select(records, sl, table=table)}
        missing = [c for c in expected if c.cell_id not in done_ids]
        spent = sum(r["seconds"] for r in recs)
        left = sum(estimate_seconds(c, records) for c in missing)
        total_spent, total_left = total_spent + spent, total_left + left
        left_txt = _hms(left) if missing else "—"
        out.append(f"| {table} | {len(expected) - len(missing)} of {len(expected)} | "
                   f"{_hms(spent)} | {len(missing)} | {left_txt} |")  # fmt: skip
    out += [f"| **all** | | {_hms(total_spent)} | | {_hms(total_left)} |", ""]
    devices = sorted({r.get("device", "?") for r in _select(records, sl)})
    if devices:
        out += ["Devices: " + "; ".join(devices) + ".", ""]
    return out


def _adapters_never_improved(rec: dict[str, Any]) -> bool:
    """Whether every phase a cell trained itself kept its starting point (best epoch 0)."""
    own = [p for p in rec.get("phases", []) if p["name"] not in rec.get("shared_phases", [])]
    return bool(own) and all(int(p["best_epoch"]) == 0 for p in own)


def _domain_auc(rec: dict[str, Any], division: str, domain: str) -> float:
    return float(next(d["auc"] for d in rec["test"][division]["domains"] if d["domain"] == domain))


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


#: when the 16-bit CPU dropout mask and fused Adam landed (commit 55d6374)
FAST_DROPOUT_SINCE = "2026-11-24T10:58:00Z"


def _code_line(records: list[dict[str, Any]]) -> str:
    """Which training code the cached cells ran with (same distributions, other streams)."""
    stamps = [str(r.get("finished_at", "")) for r in records if not r.get("same_run_as")]
    old = sum(1 for t in stamps if t and t < FAST_DROPOUT_SINCE)
    if not old:
        return ""
    return (
        f"* Code: {old} of the {len(stamps)} cells finished before {FAST_DROPOUT_SINCE} ran "
        "with torch's per-element Bernoulli dropout and multi-tensor Adam; the rest with the "
        "16-bit CPU dropout mask (`models.layers.Dropout`) and fused Adam, which draw the same "
        "distributions from other random streams and run an epoch several times faster. A "
        "seed therefore does not reproduce an older cell bit for bit; it is one more sample "
        "of the same experiment."
    )


def _setup_section(records: list[dict[str, Any]] | None = None) -> list[str]:
    code = _code_line(records or [])
    return [
        "## Setup",
        "",
        "* Data: MovieLens-1M from `../shared/data/ml-1m` (`ratings_no_timestamp.dat`). "
        "MLoRA setting (Table 1, Figure 2, add-domain): user id, movie id and the domain as "
        "sparse fields, label rating = 5, per-domain 60/20/20 split stratified on the label, "
        "data seed 2024 for every model seed. MultiLoRA setting: the `ml1m-multilora` preset "
        "(HAMUR's fields, label rating > 3, random 8:1:1 split).",
        "* Training: `training.methods.run_training` with the settings' published "
        "hyper-parameters (embedding 8, tower 256-128-64, dropout 0.5, Adam 1e-3, batch 1024, "
        "L2 1e-5 on embeddings/linear/cross for MLoRA; embedding 16, tower 256-128, LoRA rank "
        "8, fusion rank 8 for MultiLoRA, with the project defaults the paper leaves open: "
        "dropout 0.2, Adam 1e-3, batch 1024), up to 10 epochs per phase, early stopping on "
        "the mean per-domain validation AUC with patience 3 and the best epoch restored.",
        "* Seeds 1, 2, 3 per cell (model initialisation and batch order; the data split is "
        'fixed). Mean ± sample standard deviation; "within seed noise" means the difference '
        "of means is smaller than the larger of the two standard deviations (a rough screen, "
        "three seeds are too few for a formal test).",
        "* Phase 1 (the backbone) is trained once per (setting, backbone, seed) and shared by "
        "every method of that group, as are MultiLoRA's LoRA phases by SingleLoRA and the "
        "-add / -avg ablations; a shared phase is the identical computation "
        "(tests/training/test_reproduce.py checks the weights match an unshared run).",
        "* Timings are wall-clock seconds per cell on a machine shared with other work, so "
        "they are noisy. Several `mdlora reproduce` processes can work through one grid side "
        "by side (`--workers N` starts them; a lock per group keeps them apart); the thread "
        "count per process is in the device line above. On the shared 2-core machine, one "
        "thread per process was used: "
        "with two threads, a training step ran about 15 times slower under contention "
        "(measured before `mdlora` shortened OpenMP's spin-wait, `GOMP_SPINCOUNT=10000`).",
        *([code] if code else []),
        "",
    ]


def _discussion(records: list[dict[str, Any]], sl: Slice, results_dir: Path) -> list[str]:
    """Why the numbers differ; every figure quoted here is computed from the cache."""
    stats = table1_stats(records, sl)
    stds = [100 * s.std for s in stats.values() if s.std is not None]
    gaps = [abs(100 * ((stats[(sp, b, "mlora")].mean or 0) - (stats[(sp, b, "base")].mean or 0)))
            for (sp, b, m) in stats if m == "base" and (sp, b, "mlora") in stats]  # fmt: skip
    if stds:
        seeds = (
            "Over the cells with two or more seeds, the seed standard deviation of WAUC is "
            f"{statistics.fmean(stds):.2f} points on average (max {max(stds):.2f})"
        )
        if gaps:
            seeds += (f", against a mean |MLoRA − Base| of {statistics.fmean(gaps):.2f} points "
                      "over the cells run")  # fmt: skip
        seeds += "."
    else:
        seeds = ("No cell has a second seed yet, so the seed noise of our numbers is not "
                 "measured; ALGORITHMS.md §7 puts it at 0.1-0.3 WAUC points.")  # fmt: skip
    best: dict[str, list[int]] = defaultdict(list)
    runs: dict[str, list[int]] = defaultdict(list)
    for r in _select(records, sl):
        if r.get("same_run_as"):
            continue
        for ph in r.get("phases", []):
            if ph["name"] in r.get("shared_phases", []):
                continue
            kind = ph["name"].split(":")[0]
            best[kind].append(int(ph["best_epoch"]))
            runs[kind].append(int(ph["epochs_run"]))
    if best:
        stop = "; ".join(
            f"{k}: best epoch {statistics.fmean(v):.1f} of {statistics.fmean(runs[k]):.1f} run "
            f"({sum(1 for x in v if x == 0)} of {len(v)} never beat their starting point)"
            for k, v in sorted(best.items())
        )
    else:
        stop = "no phase has run yet"
    return [
        "## Why our numbers differ from the papers'",
        "",
        f"* **Seeds.** The papers report one run per cell. {seeds} Differences between methods "
        "smaller than the seed noise are flagged in the tables and should not be read as a "
        "ranking.",
        "* **Preprocessing.** Our MLoRA-setting split is per domain, stratified on the label, "
        "with data seed 2024; the public code's exact shuffling and its age-id bug "
        "(ALGORITHMS.md §1) are not copied, so absolute WAUCs can move by a few tenths. The "
        "MultiLoRA setting follows HAMUR's fields; its dropout, optimiser and batch size are "
        "not given by the paper and are project defaults.",
        "* **Public code behaviour.** MoE-MLoRA's public code did not actually freeze its "
        "phases and never trained the gate's domain embedding (ALGORITHMS.md §4); we follow "
        "the paper with real freezing, which can move MoE-MLoRA's numbers relative to the "
        "published ones. MLoRA's stage 2 trains A, B and c (the public variant with "
        "zero-initialised A, where only c learns, is not copied).",
        f"* **Early stopping** (mean per-domain validation AUC, patience 3, best epoch "
        f"restored), per phase kind over the phases trained so far: {stop}. A phase that never "
        "beats its starting point leaves the model exactly as it was (for MLoRA: the Base "
        "backbone), which is why some MLoRA and Base numbers coincide.",
        *_probe_lines(results_dir),
        "* **Adding a domain.** The held-out occupation's users occur in no other occupation, "
        "so their ids are unknown to the model that never saw the domain and only the adapter "
        "can learn; the full retraining learned their embeddings. The gap between the two is "
        "the price of not retraining; the other domains' scores stay bit-identical.",
        "",
    ]


def _probe_lines(results_dir: Path) -> list[str]:
    """The adapter-phase probe (``scripts/probe_adapter_phase.py``), when it has run."""
    files = sorted((results_dir / "probe").glob("*.json"))
    if not files:
        return [
            "* **Why the adapter phases stop at epoch 0.** Not probed yet: "
            "`.venv/bin/python scripts/probe_adapter_phase.py` measures training vs validation "
            "AUC while the adapters train past the early-stopping point."
        ]
    out = [
        "* **Why the adapter phases stop at epoch 0.** `scripts/probe_adapter_phase.py` "
        "trains phase 1 as above, then keeps training from it without early stopping and "
        "measures the mean per-domain AUC on 200k training rows and on the validation split "
        "(eval mode) along the way. Training AUC rises while validation AUC falls from the "
        "first hundred steps, for the adapters (backbone frozen) as for the backbone itself: "
        "the backbone stopped where its user and movie id embeddings had begun to memorise "
        "the training rows, and a second phase on the same rows fits that memorised signal, "
        "which does not carry over to validation. With only ids and the domain as features, "
        "the domain's effect is already in the backbone (the domain is an embedded field), "
        "so there is little left for a per-domain adapter to add. The synthetic data, whose "
        "domains differ by construction, shows the adapters working (the quick start and "
        "tests/training). Measured:",
        "",
        "  | probe | continuation | steps | train AUC | val AUC |",
        "  |---|---|---|---|---|",
    ]
    for f in files:
        rec = json.loads(f.read_text())
        backbone = BACKBONE_LABELS.get(rec["backbone"], rec["backbone"])
        tag = f"{rec['split']} / {backbone} / seed {rec['seed']}"
        for name, points in rec["runs"].items():
            first, last = points[0], points[-1]
            trail = ", ".join(f"{100 * p['val_auc']:.2f}" for p in points)
            out.append(
                f"  | {tag} | {name} | 0 → epoch {last['epoch']} | "
                f"{100 * first['train_auc']:.2f} → {100 * last['train_auc']:.2f} | "
                f"{100 * first['val_auc']:.2f} → {100 * last['val_auc']:.2f} ({trail}) |"
            )
    out.append("")
    return out


# ------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> Path:
    """Save a figure atomically (several workers may rebuild the report at once)."""
    plt = _plt()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table1(stats: dict[tuple[str, str, str], Stat], split: str, docs_dir: Path) -> Path | None:
    """Grouped bars of the three methods per backbone, error bars = std over seeds."""
    if not any(k[0] == split for k in stats):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.27
    lo, hi = math.inf, -math.inf
    for j, m in enumerate(TABLE1_METHODS):
        xs, ys, es = [], [], []
        for i, bb in enumerate(TABLE1_BACKBONES):
            s = stats.get((split, bb, m))
            if s is None or s.mean is None:
                continue
            xs.append(i + (j - 1) * width)
            ys.append(100 * s.mean)
            es.append(100 * (s.std or 0.0))
            lo, hi = min(lo, ys[-1] - es[-1]), max(hi, ys[-1] + es[-1])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=LABELS[m], color=f"C{j}")
    for j, m in enumerate(TABLE1_METHODS):
        ax.axhline(PAPER_TABLE1_AVG[split][m], ls="--", lw=0.8, color=f"C{j}")
    lo = min(lo, min(PAPER_TABLE1_AVG[split].values()))
    hi = max(hi, max(PAPER_TABLE1_AVG[split].values()))
    ax.set_ylim(lo - 0.3, hi + 0.3)
    ax.set_xticks(range(len(TABLE1_BACKBONES)))
    ax.set_xticklabels([BACKBONE_LABELS[b] for b in TABLE1_BACKBONES])
    ax.set_ylabel("test WAUC %")
    ax.set_title(f"ML-{split}: bars ours (± std over seeds), dashed lines the paper's averages")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    path = Path(docs_dir) / f"results_table1_{split}.png"
    return _save(fig, path)


def plot_figure2(stats: dict[tuple[str, int], Stat], docs_dir: Path) -> Path | None:
    if not stats:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for bb in FIGURE2_BACKBONES:
        pts = [(2 * k, stats[(bb, k)]) for k in FIGURE2_EXPERTS if (bb, k) in stats]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [100 * (p[1].mean or 0) for p in pts],
                    yerr=[100 * (p[1].std or 0) for p in pts], marker="o", capsize=3,
                    label=BACKBONE_LABELS[bb])  # fmt: skip
    ax.set_xticks([2 * k for k in FIGURE2_EXPERTS])
    ax.set_xlabel("experts in total (gender: 2 domains)")
    ax.set_ylabel("test WAUC %")
    ax.set_title("MoE-MLoRA, ML-gender: number of experts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(docs_dir) / "results_figure2_experts.png"
    return _save(fig, path)


def plot_multilora(recs: list[dict[str, Any]], docs_dir: Path) -> Path | None:
    mlp = [r for r in recs if r["backbone"] == "mlp"]
    if not mlp:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs, ys, es, ps = [], [], [], []
    for i, m in enumerate(MULTILORA_METHODS_MLP):
        s = Stat([r["test"]["age_group"]["auc"] for r in mlp if r["method"] == m])
        xs.append(i)
        ys.append(s.mean or math.nan)
        es.append(s.std or 0.0)
        ps.append(PAPER_MULTILORA.get(("mlp", m), math.nan))
    ax.bar(xs, ys, 0.6, yerr=es, capsize=3, label="ours")
    ax.plot(xs, ps, "k_", markersize=18, mew=2, label="paper")
    vals = [v for v in ys + ps if not math.isnan(v)]
    ax.set_ylim(min(vals) - 0.01, max(vals) + 0.01)
    ax.set_xticks(xs)
    ax.set_xticklabels([LABELS[m] for m in MULTILORA_METHODS_MLP], rotation=20, fontsize=8)
    ax.set_ylabel("total test AUC")
    ax.set_title("MultiLoRA setting, MLP backbone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(docs_dir) / "results_multilora_mlp.png"
    return _save(fig, path)


def reproduce(
    settings: Settings,
    tables: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    backbones: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    report_only: bool = False,
    report_every: bool = True,
) -> tuple[list[dict[str, Any]], Path]:
    """The ``mdlora reproduce`` command: run the chosen cells, then rebuild the report.

    ``report_every`` rebuilds the report after each finished cell, so a long run's results
    page is always current.
    """
    new: list[dict[str, Any]] = []
    if not report_only:
        cells = build_grid(tables, splits, backbones, methods, seeds, settings.data_slice)
        if not cells:
            raise ReproduceError("the filters select no cell; see `mdlora reproduce --help`")

        def refresh(cell: Cell, record: dict[str, Any]) -> None:
            if report_every:
                write_report(settings)

        new = run_grid(cells, settings, refresh)
    return new, write_report(settings)


def with_slice(settings: Settings, sl: Slice) -> Settings:
    return replace(settings, data_slice=sl)
