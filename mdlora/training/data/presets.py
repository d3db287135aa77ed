"""The named data settings of ALGORITHMS.md section 1, as ready-to-train :class:`PreparedData`.

* :func:`mlora_setting` -- MovieLens-1M, "MLoRA setting" (MLoRA, MoE-MLoRA): label
  ``rating == 5``; fields user id, movie id and the domain itself (a third sparse field named
  after the division); one division out of gender (F, M), age (codes 1,18,25,35,45,50,56 ->
  0..6) or occupation (codes 0..20 -> 0..20); per-domain 60/20/20 split stratified on the
  label.
* :func:`multilora_setting` -- MovieLens-1M, "MultiLoRA setting" (MultiLoRA, after HAMUR):
  label ``rating > 3``; natural division ``age_group`` ({1,18}, {25}, {35,45,50,56}) and
  auxiliary division ``gender``; sparse user id, movie id, gender, occupation, zip, first
  genre and the domain indicator; dense age scaled to [0, 1]; optionally all genres as a
  mean-pooled multi-hot field named ``genres`` (our extension); random 8:1:1 split.

Both also take a MovieLens-100K folder (``u.data``, ``u.user``, ``u.item``; detected from the
files, or use the ``ml100k-*`` preset names): ages in years are bucketed into ML-1M's age codes
(under 18 -> 1, 18-24 -> 18, 25-34 -> 25, 35-44 -> 35, 45-49 -> 45, 50-55 -> 50, 56+ -> 56)
so the age and age-group divisions mean the same, and the occupation domains are ML-100K's 21
occupation names.

The encoder is always fitted on the training split only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdlora.formats.encoder import FeatureEncoder, MultiHotColumn
from mdlora.training.data.movielens import ML1M_AGE_CODES, load_movielens_1m, load_movielens_100k
from mdlora.training.data.prepared import PreparedData, encode_splits
from mdlora.training.data.splits import random_split, stratified_domain_split, subsample

__all__ = [
    "MLORA_DIVISIONS",
    "MLORA_HPARAMS",
    "MOVIELENS_ALPHA",
    "MULTILORA_AGE_GROUPS",
    "MULTILORA_HPARAMS",
    "PRESETS",
    "mlora_setting",
    "multilora_setting",
    "prepare_preset",
    "subsample",
]

#: domain values of each MLoRA-setting division, in id order
MLORA_DIVISIONS: dict[str, list[str]] = {
    "gender": ["F", "M"],
    "age": [str(a) for a in ML1M_AGE_CODES],
    "occupation": [str(i) for i in range(21)],
}

#: MLoRA's published rank temperatures alpha for MovieLens, per backbone (ALGORITHMS.md §3)
MOVIELENS_ALPHA: dict[str, float] = {
    "autoint": 4, "dcn": 16, "deepfm": 32, "fibinet": 32, "nfm": 4,
    "pnn": 16, "wdl": 16, "xdeepfm": 32, "mlp": 16,
}  # fmt: skip

MLORA_HPARAMS: dict[str, Any] = {
    "alpha": MOVIELENS_ALPHA,  # per backbone
    "embed_dim": 8,
    "tower": [256, 128, 64],
    "dropout": 0.5,
    "optimizer": "adam",
    "lr": 1e-3,
    "batch_size": 1024,
    "l2": 1e-5,  # on embeddings and linear / cross parts
    "split": [0.6, 0.2, 0.2],
}

#: MultiLoRA's natural division: domain name -> ML-1M age codes
MULTILORA_AGE_GROUPS: dict[str, tuple[int, ...]] = {
    "1-18": (1, 18),
    "25": (25,),
    "35-56": (35, 45, 50, 56),
}

MULTILORA_HPARAMS: dict[str, Any] = {
    "alpha": MOVIELENS_ALPHA,  # MLoRA-style methods on this setting (MultiLoRA: lora_rank)
    "embed_dim": 16,
    "tower": [256, 128],
    "lora_rank": [8, 8],
    "lora_rank_methods": ["multilora"],  # the methods whose ranks the paper gives
    "fusion_rank": [8, 8],
    "split": [0.8, 0.1, 0.1],
    # not given by the paper: project defaults
    "dropout": 0.2,
    "optimizer": "adam",
    "lr": 1e-3,
    "batch_size": 1024,
    "l2": 1e-5,
    "defaults_not_from_paper": ["dropout", "optimizer", "lr", "batch_size", "l2"],
}


def ml100k_age_codes(years: pd.Series) -> pd.Series:
    """Ages in years -> ML-1M's age codes (the lower bound of each ML-1M age band)."""
    bounds = np.array(ML1M_AGE_CODES[1:])  # 18, 25, 35, 45, 50, 56
    codes = np.array(ML1M_AGE_CODES)
    return pd.Series(codes[np.searchsorted(bounds, years.to_numpy(), side="right")],
                     index=years.index)  # fmt: skip


def _ratings(data: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The ratings frame and which MovieLens it is (``ml1m`` or ``ml100k``)."""
    if isinstance(data, pd.DataFrame):  # from load_movielens_1m / load_movielens_100k
        occupation = data["occupation"]  # ML-1M: integer codes; ML-100K: names
        if pd.api.types.is_integer_dtype(occupation) or occupation.astype(str).str.isdigit().all():
            return data, "ml1m"
        if not data["age"].isin(ML1M_AGE_CODES).all():  # ML-100K ages in years
            data = data.assign(age=ml100k_age_codes(data["age"]))
        return data, "ml100k"
    if (Path(data) / "u.data").is_file():
        raw = load_movielens_100k(data)
        return raw.assign(age=ml100k_age_codes(raw["age"])), "ml100k"
    return load_movielens_1m(data), "ml1m"


def load_movielens(path: str | Path) -> pd.DataFrame:
    """A MovieLens-1M or -100K folder as one ratings frame, ages as ML-1M's codes."""
    return _ratings(path)[0]


def mlora_setting(
    data: str | Path | pd.DataFrame,
    division: str = "age",
    *,
    seed: int = 2024,
    max_rows: int | None = None,
    sample_frac: float | None = None,
) -> PreparedData:
    """MovieLens-1M in the MLoRA setting, for one division (``gender``, ``age``, ``occupation``).

    ``data`` is the ML-1M folder, or a frame from :func:`load_movielens_1m` (to load once and
    prepare several divisions). Sparse fields: ``user_id``, ``movie_id`` and the division
    column itself (the domain as an embedded field); the division is the only one.
    """
    if division not in MLORA_DIVISIONS:
        raise ValueError(f"unknown MLoRA division {division!r}; use one of {list(MLORA_DIVISIONS)}")
    full, kind = _ratings(data)
    raw = subsample(full, max_rows, sample_frac, seed)
    df = raw[["user_id", "movie_id", division]].reset_index(drop=True)
    labels = (raw["rating"].to_numpy() == 5).astype(np.float32)
    names = MLORA_DIVISIONS[division]
    if kind == "ml100k" and division == "occupation":
        names = sorted(full["occupation"].astype(str).unique())  # ML-100K: occupation names
    encoder = FeatureEncoder(
        sparse=["user_id", "movie_id", division],
        divisions=[division],
        domain_order={division: names},
    )
    # domain ids for the split, before any fitting (names are fixed by the setting)
    dom = pd.Index(names).get_indexer(pd.Index(df[division].astype(str)))
    if (dom < 0).any():
        bad = sorted(set(df[division].astype(str)[dom < 0]))
        raise ValueError(f"division {division!r}: unexpected values {bad[:10]}")
    splits = stratified_domain_split(dom, labels, MLORA_HPARAMS["split"], seed)
    train, val, test = encode_splits(df, encoder, labels, splits)
    return PreparedData(
        name=f"{kind}-mlora-{division}",
        encoder=encoder,
        train=train,
        val=val,
        test=test,
        divisions=[division],
        domain_names={division: list(names)},
        hparams=dict(MLORA_HPARAMS),
        info={"label": "rating == 5", "domain_field": division, "seed": seed},
    )


def multilora_setting(
    data: str | Path | pd.DataFrame,
    *,
    with_genres: bool = False,
    seed: int = 2024,
    max_rows: int | None = None,
    sample_frac: float | None = None,
) -> PreparedData:
    """MovieLens-1M in the MultiLoRA setting (divisions ``age_group`` then ``gender``).

    ``with_genres=True`` adds the all-genres multi-hot field ``genres`` (mean-pooled; our
    extension, not in the paper).
    """
    full, kind = _ratings(data)
    raw = subsample(full, max_rows, sample_frac, seed)
    code_to_group = {c: g for g, codes in MULTILORA_AGE_GROUPS.items() for c in codes}
    age_group = raw["age"].map(code_to_group)
    if age_group.isna().any():
        bad = sorted(set(raw["age"][age_group.isna()]))
        raise ValueError(f"unexpected ML-1M age codes {bad}; expected {list(ML1M_AGE_CODES)}")
    cols = ["user_id", "movie_id", "gender", "occupation", "zip", "first_genre", "age"]
    df = raw[cols].reset_index(drop=True)
    df["age_group"] = age_group.to_numpy()
    multi_hot: list[MultiHotColumn] = []
    if with_genres:
        df["genres"] = raw["genres"].to_numpy()  # shared list objects: fast to encode
        multi_hot.append(MultiHotColumn("genres", max_len=6))  # ML-1M movies have <= 6 genres
    labels = (raw["rating"].to_numpy() > 3).astype(np.float32)
    groups = list(MULTILORA_AGE_GROUPS)
    encoder = FeatureEncoder(
        sparse=["user_id", "movie_id", "gender", "occupation", "zip", "first_genre", "age_group"],
        multi_hot=multi_hot,
        dense=["age"],
        divisions=["age_group", "gender"],
        domain_order={"age_group": groups, "gender": ["F", "M"]},
    )
    splits = random_split(len(df), MULTILORA_HPARAMS["split"], seed)
    train, val, test = encode_splits(df, encoder, labels, splits)
    name = f"{kind}-multilora-genres" if with_genres else f"{kind}-multilora"
    return PreparedData(
        name=name,
        encoder=encoder,
        train=train,
        val=val,
        test=test,
        divisions=["age_group", "gender"],
        domain_names={"age_group": groups, "gender": ["F", "M"]},
        hparams=dict(MULTILORA_HPARAMS),
        info={"label": "rating > 3", "domain_field": "age_group", "seed": seed},
    )


def _taobao(n: int) -> Callable[..., PreparedData]:
    def prepare(data: str | Path, **kw: Any) -> PreparedData:
        from mdlora.training.data.taobao import taobao_setting

        return taobao_setting(data, n_domains=n, **kw)

    return prepare


#: name -> function(data path or frame, **options) -> PreparedData
PRESETS: dict[str, Callable[..., PreparedData]] = {
    "ml1m-mlora-gender": lambda data, **kw: mlora_setting(data, "gender", **kw),
    "ml1m-mlora-age": lambda data, **kw: mlora_setting(data, "age", **kw),
    "ml1m-mlora-occupation": lambda data, **kw: mlora_setting(data, "occupation", **kw),
    "ml1m-multilora": lambda data, **kw: multilora_setting(data, **kw),
    "ml1m-multilora-genres": lambda data, **kw: multilora_setting(data, with_genres=True, **kw),
    # the same settings on a MovieLens-100K folder (the ml1m-* names accept one too)
    "ml100k-mlora-gender": lambda data, **kw: mlora_setting(data, "gender", **kw),
    "ml100k-mlora-age": lambda data, **kw: mlora_setting(data, "age", **kw),
    "ml100k-mlora-occupation": lambda data, **kw: mlora_setting(data, "occupation", **kw),
    "ml100k-multilora": lambda data, **kw: multilora_setting(data, **kw),
    "ml100k-multilora-genres": lambda data, **kw: multilora_setting(data, with_genres=True, **kw),
    "taobao-10": _taobao(10),
    "taobao-20": _taobao(20),
    "taobao-30": _taobao(30),
}


def prepare_preset(name: str, data: str | Path | pd.DataFrame, **kwargs: Any) -> PreparedData:
    """Prepare a named setting (see :data:`PRESETS`) from its data path."""
    try:
        fn = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
    return fn(data, **kwargs)
