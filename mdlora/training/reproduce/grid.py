"""The grid: the papers' numbers, what a cell is, which cells a run asks for, where things live."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdlora.models.methods import method_of
from mdlora.training.config import METHOD_LABELS, MODEL_METHOD, REPO_ROOT

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

#: the grid's method names: the training methods' labels, and MultiLoRA's fusion ablations
LABELS = {**METHOD_LABELS, **{f"multilora-{f}": f"MultiLoRA-{f}" for f in ("add", "avg")}}
#: the MultiLoRA paper's names for the grid's methods where its tables name them otherwise:
#: Base, one model trained on every domain's rows mixed together, is its "Mix"
MULTILORA_PAPER_NAMES = {"base": "Mix"}
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
#: the method the add-domain table grows a held-out domain into (MLoRA: a domain is one more
#: adapter); its full retraining is Table 1's occupation cells
ADD_DOMAIN_METHOD = "mlora"
#: the method whose experts per domain Figure 2 varies (MoE-MLoRA)
FIGURE2_METHOD = "moe"
#: the method whose model the paper's Table 7 counts (both LoRA sets and the attention fusion);
#: the report's trainable-parameter rows read its cells' ``param_counts``
TABLE7_METHOD = "multilora"


class ReproduceError(RuntimeError):
    """The grid cannot run as asked; the message says what to change."""


def train_method_of(method: str) -> str:
    """The ``TrainConfig.method`` grid method ``method`` trains (``multilora-add``:
    ``multilora``, fusion add)."""
    return method.split("-")[0]


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
        has_experts = method_of(MODEL_METHOD[self.train_method]).has_experts
        return self.method + (f"-k{self.experts}" if has_experts else "")

    @property
    def train_method(self) -> str:
        """The ``TrainConfig.method`` (``multilora-add`` trains ``multilora``, fusion add)."""
        return train_method_of(self.method)

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
            and (ADD_DOMAIN_METHOD in want_methods)
        ):
            for b in _keep(ADD_DOMAIN_BACKBONES, want_bb):
                # the full retraining it is compared with: Table 1's occupation cells
                parts.append(t1("occupation", seed, [b], ["base", ADD_DOMAIN_METHOD]))
                parts.append(
                    [Cell("add_domain", "occupation", b, ADD_DOMAIN_METHOD, seed, slice=sl)]
                )
        if "figure2" in want_tables and "gender" in want_splits and FIGURE2_METHOD in want_methods:
            parts.append([Cell("figure2", "gender", b, FIGURE2_METHOD, seed, k, sl)
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
    from mdlora.training.data.movielens import find_ml1m_ratings

    folder = Path(data_dir) / "ml-1m"
    try:
        find_ml1m_ratings(folder)
    except FileNotFoundError as exc:
        raise ReproduceError(
            f"MovieLens-1M not found under {data_dir} ({exc}); pass --data-dir or set "
            f"{DATA_ENV} to the folder that holds ml-1m/"
        ) from None
    return folder
