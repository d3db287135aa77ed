"""A small synthetic artifact for tests, benchmarks and trying the service without data.

The model is built in-process (no training): MovieLens-shaped synthetic users and items, a
fitted :class:`~mdlora.formats.encoder.FeatureEncoder`, and random (non-zero) adapter weights so
that domains really score differently. :func:`demo_adapter` makes the adapter package a trained
``mdlora add-domain`` would write, with random weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from mdlora.formats.adapter_package import (
    AdapterPackage,
    make_adapter_package,
)
from mdlora.formats.artifact import save_artifact
from mdlora.formats.encoder import FeatureEncoder, MultiHotColumn
from mdlora.models.lora import AdapterBank
from mdlora.models.model import Division, ModelConfig, MultiDomainModel

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "War")
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
AGE_GROUPS = {1: "1-18", 18: "1-18", 25: "25", 35: "35-56", 45: "35-56", 50: "35-56", 56: "35-56"}
#: the request fields that name the user and the item in demo artifacts
SERVING = {"user_id_field": "user_id", "item_id_field": "movie_id"}


@dataclass
class DemoData:
    """The synthetic ratings (one row per user-item pair) and the fitted encoder."""

    frame: pd.DataFrame
    encoder: FeatureEncoder


def demo_frame(
    n_users: int = 200, n_items: int = 300, n_rows: int = 4000, seed: int = 0
) -> pd.DataFrame:
    """Synthetic ratings with user attributes (gender, age, occupation) and item genres."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "gender": rng.choice(["F", "M"], n_users),
            "age": rng.choice(AGE_CODES, n_users),
            "occupation": rng.integers(0, 21, n_users),
        }
    )
    users["age_group"] = users["age"].map(AGE_GROUPS)
    n_g = rng.integers(1, 4, n_items)
    genres = [list(rng.choice(GENRES, k, replace=False)) for k in n_g]
    items = pd.DataFrame(
        {
            "movie_id": np.arange(1, n_items + 1) * 3,  # ids that are not row numbers
            "genres": ["|".join(g) for g in genres],
            "first_genre": [g[0] for g in genres],
        }
    )
    rows = pd.DataFrame(
        {
            "user_id": rng.integers(1, n_users + 1, n_rows),
            "movie_id": (rng.integers(0, n_items, n_rows) + 1) * 3,
        }
    )
    rows = rows.merge(users, on="user_id", how="left").merge(items, on="movie_id", how="left")
    rows["label"] = (rng.random(n_rows) < 0.3).astype(np.float32)
    return rows


def _encoder(method: str, division: str) -> FeatureEncoder:
    if method == "multilora":
        return FeatureEncoder(
            sparse=["user_id", "movie_id", "gender", "occupation", "first_genre", "age_group"],
            multi_hot=[MultiHotColumn("genres", max_len=3)],
            dense=["age"],
            divisions=["age_group", "gender"],
            domain_order={"age_group": ["1-18", "25", "35-56"], "gender": ["F", "M"]},
        )
    orders: dict[str, list[object]] = {
        "gender": ["F", "M"],
        "age": list(AGE_CODES),
        "occupation": list(range(21)),
    }
    return FeatureEncoder(
        sparse=["user_id", "movie_id", division],
        divisions=[division],
        domain_order={division: orders[division]},
    )


@torch.no_grad()
def _randomise(model: MultiDomainModel, seed: int) -> None:
    """Give embeddings and every adapter / gate / norm tensor non-trivial random values."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith(("embedding.", "linear.")):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        elif name.startswith(("tower.banks.", "tower.lora_sets.", "gate.", "tower.fusions.")):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    for name, b in model.named_buffers():
        if name.startswith("tower.domain_norms.") and name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        elif name.startswith("tower.domain_norms.") and name.endswith("running_var"):
            b.copy_(1.0 + torch.rand(b.shape, generator=gen))


def demo_model(
    method: str = "mlora",
    division: str = "age",
    backbone: str = "deepfm",
    tower: tuple[int, ...] = (64, 32),
    seed: int = 0,
    data: DemoData | None = None,
    **config: object,
) -> tuple[MultiDomainModel, DemoData]:
    """A random-weight model of ``method`` over the demo features, with its fitted encoder."""
    if data is None:
        frame = demo_frame(seed=seed)
        data = DemoData(frame, _encoder(method, division).fit(frame))
    enc = data.encoder
    divisions = tuple(Division(d, tuple(enc.domain_names(d))) for d in enc.divisions)
    torch.manual_seed(seed)
    config = {"alpha": 32.0, **config}  # adapter ranks 2, 1 for the default tower
    cfg = ModelConfig(
        features=enc.feature_spec(),
        divisions=divisions,
        backbone=backbone,
        embed_dim=8,
        tower=tower,
        dropout=0.1,
        method=method,
        **config,  # type: ignore[arg-type]
    )
    model = MultiDomainModel(cfg)
    _randomise(model, seed)
    model.eval()
    return model, data


def build_demo_artifact(
    directory: Path | str,
    method: str = "mlora",
    division: str = "age",
    backbone: str = "deepfm",
    tower: tuple[int, ...] = (64, 32),
    seed: int = 0,
    **config: object,
) -> Path:
    """Write a demo artifact directory (see module docstring) and return its path."""
    model, data = demo_model(method, division, backbone, tower, seed, None, **config)
    return save_artifact(
        model,
        directory,
        encoder=data.encoder.to_dict(),
        metrics={"demo": True},
        extra={"serving": dict(SERVING)},
    )


@torch.no_grad()
def demo_adapter(
    model: MultiDomainModel, division: str, domain: str, seed: int = 1, version: int = 1
) -> AdapterPackage:
    """A random adapter package for ``domain`` (new or existing) that fits ``model``."""
    work = copy.deepcopy(model)
    new = domain not in work.domain_names(division)
    if new:
        work.add_domain(division, domain, gate_scope="own")
    idx = work.domain_names(division).index(domain)
    gen = torch.Generator().manual_seed(seed)
    tower = work.tower
    banks = cast(
        nn.ModuleList, tower.banks if tower.banks is not None else tower.lora_sets[division]
    )
    rows = [idx]
    if work.gate is not None:
        rows = (work.gate.owner == idx).nonzero().squeeze(1).tolist()
    for bank in cast(list[AdapterBank], list(banks)):
        for r in rows:
            bank.B[r] = torch.randn(bank.B[r].shape, generator=gen) * 0.3
            bank.bias[r] = torch.randn(bank.bias[r].shape, generator=gen) * 0.3
    pkg = make_adapter_package(work, division, domain, version)
    if work.gate is not None and new:
        pkg.config["gate_scope"] = "own"
    return pkg
