"""Taobao theme-click data (MLoRA, MoE-MLoRA): file layout, negative sampling, preparation.

The raw data is not redistributable; this module supports its layout and ships a generator of
a small synthetic folder with the same shape (:func:`write_synthetic_taobao`).

Folder layout (each table as ``.parquet`` or ``.csv``)::

    clicks.*        user_id, item_id, theme_id [, timestamp]   one row per click, in log order
    user_vectors.*  user_id, then D float columns               (optional; frozen pretrained)
    item_vectors.*  item_id, then D float columns               (optional; frozen pretrained)

Pretrained vectors may instead be columns of ``clicks`` named ``uvec_*`` / ``ivec_*``.

Preparation (ALGORITHMS.md section 1): the first ``n_domains`` themes in order of first
appearance (by ``timestamp`` when present, else row order) are the domains; clicks are the
positives (a repeated (user, item, theme) click counts once); for every theme a target CTR
``c ~ U(0.2, 0.5)`` is drawn and each user gets ``round(p * (1 - c) / c)`` negatives for their
``p`` positives in the theme, sampled from the theme's item pool (items clicked in that theme),
excluding the user's own positives there; split 60/20/20 per theme, stratified.

Features: sparse ``user_id``, ``item_id`` and the theme (``theme_id``, the domain as a field);
when vectors are present, ``uvec_0..`` and ``ivec_0..`` as dense fields (min-max scaled like any
dense field). The division is ``theme_id``; domain names are the theme ids as strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdlora.formats.encoder import FeatureEncoder, canonical_value
from mdlora.training.data.prepared import DataError, PreparedData, encode_splits
from mdlora.training.data.presets import MLORA_HPARAMS
from mdlora.training.data.splits import stratified_domain_split, subsample

__all__ = [
    "TAOBAO_ALPHA",
    "TAOBAO_HPARAMS",
    "build_taobao_frame",
    "load_taobao",
    "sample_negatives",
    "taobao_setting",
    "write_synthetic_taobao",
]

#: MLoRA's published rank temperatures alpha for Taobao, per backbone (ALGORITHMS.md §3)
TAOBAO_ALPHA: dict[str, float] = {
    "autoint": 16, "dcn": 16, "deepfm": 256, "fibinet": 256, "nfm": 16,
    "pnn": 16, "wdl": 16, "xdeepfm": 16, "mlp": 256,
}  # fmt: skip

#: the MLoRA paper's setting, as on MovieLens, with Taobao's rank temperatures
TAOBAO_HPARAMS: dict[str, Any] = {
    **MLORA_HPARAMS,
    "alpha": TAOBAO_ALPHA,  # per backbone
    "ctr_range": [0.2, 0.5],
}

_SUFFIXES = (".parquet", ".csv")


def _find(folder: Path, stem: str, required: bool) -> Path | None:
    for suf in _SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return p
    if required:
        raise FileNotFoundError(
            f"{folder}: no {stem}.parquet or {stem}.csv (expected the Taobao theme layout: "
            "clicks.* with user_id, item_id, theme_id; optional user_vectors.*, item_vectors.*)"
        )
    return None


def _read(p: Path) -> pd.DataFrame:
    from mdlora.training.data.tabular import read_table  # DataError for empty / unreadable files

    return read_table(p)


def _read_vectors(p: Path | None, key: str, prefix: str) -> pd.DataFrame | None:
    if p is None:
        return None
    df = _read(p)
    if key not in df.columns:
        raise DataError(f"{p}: missing id column {key!r}; columns present: {list(df.columns)}")
    vec_cols = [c for c in df.columns if c != key]
    if not vec_cols:
        raise DataError(f"{p}: no vector columns next to {key!r}")
    out = df[vec_cols].astype(np.float32)
    out.columns = [f"{prefix}{j}" for j in range(len(vec_cols))]
    out.insert(0, key, df[key].to_numpy())
    if out[key].duplicated().any():
        raise DataError(f"{p}: duplicate ids in {key!r}")
    return out


def load_taobao(path: str | Path) -> dict[str, pd.DataFrame | None]:
    """Read the raw tables: ``{"clicks": df, "user_vectors": df | None, "item_vectors": ...}``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Taobao folder not found: {folder}")
    clicks_path = _find(folder, "clicks", required=True)
    assert clicks_path is not None
    clicks = _read(clicks_path)
    missing = [c for c in ("user_id", "item_id", "theme_id") if c not in clicks.columns]
    if missing:
        raise DataError(
            f"{clicks_path}: missing column(s) {missing}; columns present: {list(clicks.columns)}"
        )
    return {
        "clicks": clicks,
        "user_vectors": _read_vectors(_find(folder, "user_vectors", False), "user_id", "uvec_"),
        "item_vectors": _read_vectors(_find(folder, "item_vectors", False), "item_id", "ivec_"),
    }


def taobao_feature_frame(path: str | Path) -> pd.DataFrame:
    """One row per click with the user's and the item's vectors (``uvec_*``, ``ivec_*``): what
    ``mdlora publish-features`` writes to the feature store for a Taobao-layout model."""
    tables = load_taobao(path)
    clicks = tables["clicks"]
    assert clicks is not None
    frame = clicks.copy()
    for key in ("user_vectors", "item_vectors"):
        vec = tables[key]
        if vec is not None:
            idcol = "user_id" if key == "user_vectors" else "item_id"
            frame = frame.drop(columns=[c for c in vec.columns if c != idcol and c in frame])
            frame = frame.merge(vec, on=idcol, how="left")
    return frame


def sample_negatives(
    positives: pd.DataFrame,
    ctr: float,
    rng: np.random.Generator,
    max_rounds: int = 8,
) -> pd.DataFrame:
    """Negatives for ONE theme: ``(user_id, item_id)`` pairs from the theme's item pool.

    ``positives`` holds the theme's distinct (user_id, item_id) clicks. A user with ``p``
    positives gets ``round(p * (1 - ctr) / ctr)`` negatives, distinct and never one of their
    own positives; a user whose positives cover (almost) the whole pool gets what is left.
    """
    users = positives["user_id"].to_numpy()
    items = positives["item_id"].to_numpy()
    pool, item_code = np.unique(items, return_inverse=True)
    ucodes, user_code = np.unique(users, return_inverse=True)
    n_pool = pool.size
    pos_keys = user_code.astype(np.int64) * n_pool + item_code
    n_pos = np.bincount(user_code, minlength=ucodes.size)
    want = np.rint(n_pos * (1.0 - ctr) / ctr).astype(np.int64)
    want = np.minimum(want, n_pool - n_pos)  # cannot exceed the user's unclicked pool
    chosen = np.empty(0, dtype=np.int64)
    need = want.copy()
    for _ in range(max_rounds):
        if need.sum() == 0:
            break
        # oversample a little, then keep distinct keys that are not positives
        draw_u = np.repeat(np.arange(ucodes.size), need * 2 + 1)
        keys = draw_u * n_pool + rng.integers(0, n_pool, draw_u.size)
        keys = keys[~np.isin(keys, pos_keys)]
        keys = pd.unique(np.concatenate([chosen, keys]))  # keep earlier picks, drop repeats
        ku = keys // n_pool
        # at most want[u] per user, in draw order
        order = np.argsort(ku, kind="stable")
        ku_sorted = ku[order]
        starts = np.searchsorted(ku_sorted, np.arange(ucodes.size))
        rank = np.arange(ku_sorted.size) - starts[ku_sorted]
        keep = np.sort(order[rank < want[ku_sorted]])
        chosen = keys[keep]
        need = want - np.bincount(chosen // n_pool, minlength=ucodes.size)
    return pd.DataFrame({"user_id": ucodes[chosen // n_pool], "item_id": pool[chosen % n_pool]})


def build_taobao_frame(
    clicks: pd.DataFrame,
    n_domains: int = 10,
    seed: int = 2024,
    ctr_range: tuple[float, float] = (0.2, 0.5),
) -> tuple[pd.DataFrame, list[str], dict[str, float]]:
    """Positives + sampled negatives of the first ``n_domains`` themes.

    Returns ``(frame with user_id, item_id, theme_id (str), label, ...)``, the theme names in
    domain-id order (first appearance) and the drawn target CTR per theme.
    """
    df = clicks
    if "timestamp" in df.columns:
        df = df.sort_values("timestamp", kind="stable")
    theme_key = pd.Series([canonical_value(v) for v in df["theme_id"]], index=df.index)
    if theme_key.isna().any():
        raise DataError("clicks: theme_id has missing values")
    first = list(pd.unique(theme_key.to_numpy(dtype=object)))
    if len(first) < n_domains:
        raise DataError(
            f"asked for {n_domains} themes but the clicks hold only {len(first)} (use a "
            "preset with fewer themes, e.g. taobao-10, or more clicks)"
        )
    themes = [str(t) for t in first[:n_domains]]
    pos = df.loc[theme_key.isin(themes), ["user_id", "item_id"]].copy()
    pos["theme_id"] = theme_key[theme_key.isin(themes)].to_numpy()
    pos = pos.drop_duplicates(["user_id", "item_id", "theme_id"])
    rng = np.random.default_rng(seed)
    ctrs: dict[str, float] = {}
    parts = []
    groups = dict(tuple(pos.groupby("theme_id", sort=False)))
    for t in themes:
        ctr = float(rng.uniform(*ctr_range))
        ctrs[t] = ctr
        g = groups[t]
        neg = sample_negatives(g[["user_id", "item_id"]], ctr, rng)
        neg["theme_id"] = t
        neg["label"] = np.int8(0)
        g = g.assign(label=np.int8(1))
        parts.extend([g, neg])
    frame = pd.concat(parts, ignore_index=True)
    return frame, themes, ctrs


def taobao_setting(
    data: str | Path,
    n_domains: int = 10,
    *,
    seed: int = 2024,
    use_vectors: bool = True,
    max_rows: int | None = None,
    sample_frac: float | None = None,
) -> PreparedData:
    """The Taobao-10/20/30 setting from a folder in the layout above.

    ``max_rows`` / ``sample_frac`` subsample the CLICKS (before negative sampling).
    """
    tables = load_taobao(data)
    clicks = tables["clicks"]
    assert clicks is not None
    clicks = subsample(clicks, max_rows, sample_frac, seed)
    frame, themes, ctrs = build_taobao_frame(clicks, n_domains, seed, TAOBAO_HPARAMS["ctr_range"])
    dense: list[str] = []
    if use_vectors:
        uv, iv = tables["user_vectors"], tables["item_vectors"]
        vec_in_clicks = [c for c in clicks.columns if c.startswith(("uvec_", "ivec_"))]
        if uv is None and iv is None and vec_in_clicks:
            uv = clicks.drop_duplicates("user_id")[
                ["user_id", *[c for c in vec_in_clicks if c.startswith("uvec_")]]
            ]
            iv = clicks.drop_duplicates("item_id")[
                ["item_id", *[c for c in vec_in_clicks if c.startswith("ivec_")]]
            ]
        for vec, key in ((uv, "user_id"), (iv, "item_id")):
            if vec is None or vec.shape[1] <= 1:
                continue
            cols = [c for c in vec.columns if c != key]
            pos = pd.Index(vec[key]).get_indexer(pd.Index(frame[key]))
            block = vec[cols].to_numpy(dtype=np.float32)
            values = np.where((pos >= 0)[:, None], block[np.maximum(pos, 0)], np.nan)
            frame = pd.concat(
                [frame, pd.DataFrame(values, columns=cols, index=frame.index)], axis=1
            )
            dense.extend(cols)
    labels = frame["label"].to_numpy().astype(np.float32)
    dom = pd.Index(themes, dtype=object).get_indexer(pd.Index(frame["theme_id"], dtype=object))
    splits = stratified_domain_split(dom, labels, TAOBAO_HPARAMS["split"], seed)
    encoder = FeatureEncoder(
        sparse=["user_id", "item_id", "theme_id"],
        dense=dense,
        divisions=["theme_id"],
        domain_order={"theme_id": themes},
    )
    train, val, test = encode_splits(frame, encoder, labels, splits)
    return PreparedData(
        name=f"taobao-{n_domains}",
        encoder=encoder,
        train=train,
        val=val,
        test=test,
        divisions=["theme_id"],
        domain_names={"theme_id": list(themes)},
        hparams=dict(TAOBAO_HPARAMS),
        info={"target_ctr": ctrs, "domain_field": "theme_id", "seed": seed},
    )


def write_synthetic_taobao(
    path: str | Path,
    *,
    n_users: int = 300,
    n_items: int = 1_500,
    n_themes: int = 35,
    n_clicks: int = 20_000,
    items_per_theme: int = 60,
    dim: int = 128,
    fmt: str = "parquet",
    seed: int = 0,
) -> Path:
    """Write a small synthetic folder in the Taobao theme layout (for tests and demos).

    Theme ids are large random integers whose first-appearance order differs from their sorted
    order; clicks favour items whose vector is close to the user's (so vectors carry signal).
    """
    if n_clicks < 20 * n_themes:
        raise ValueError("n_clicks must be at least 20 per theme")
    if fmt not in ("parquet", "csv"):
        raise ValueError("fmt must be 'parquet' or 'csv'")
    rng = np.random.default_rng(seed)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    theme_ids = rng.choice(np.arange(10_000, 99_999), size=n_themes, replace=False)
    pools = np.stack([rng.choice(n_items, size=items_per_theme, replace=False)
                      for _ in range(n_themes)])  # fmt: skip
    user_vec = rng.normal(0.0, 1.0, (n_users, dim)).astype(np.float32)
    item_vec = rng.normal(0.0, 1.0, (n_items, dim)).astype(np.float32)
    # uneven theme sizes (each theme at least 20 clicks); themes become active one after
    # another, with a jittered order so the themes overlap in time
    counts = 20 + rng.multinomial(n_clicks - 20 * n_themes, rng.dirichlet(np.full(n_themes, 2.0)))
    t_seq = np.repeat(np.arange(n_themes), counts)
    jitter = rng.normal(0.0, 0.02 * n_clicks, t_seq.size)
    t_of_click = t_seq[np.argsort(np.arange(t_seq.size) + jitter, kind="stable")]
    users = rng.integers(0, n_users, n_clicks)
    slot = rng.integers(0, items_per_theme, (n_clicks, 6))
    cand = pools[t_of_click[:, None], slot]
    score = np.einsum("nd,nkd->nk", user_vec[users], item_vec[cand]) / np.sqrt(dim)
    pick = np.argmax(score + rng.gumbel(size=score.shape), axis=1)
    items = cand[np.arange(n_clicks), pick]
    clicks = pd.DataFrame(
        {
            "user_id": users.astype(np.int64),
            "item_id": items.astype(np.int64),
            "theme_id": theme_ids[t_of_click].astype(np.int64),
            "timestamp": np.arange(n_clicks, dtype=np.int64) + 1_500_000_000,
        }
    )
    uv = pd.DataFrame(user_vec, columns=[f"v{j}" for j in range(dim)])
    uv.insert(0, "user_id", np.arange(n_users, dtype=np.int64))
    iv = pd.DataFrame(item_vec, columns=[f"v{j}" for j in range(dim)])
    iv.insert(0, "item_id", np.arange(n_items, dtype=np.int64))
    for name, table in (("clicks", clicks), ("user_vectors", uv), ("item_vectors", iv)):
        if fmt == "parquet":
            table.to_parquet(folder / f"{name}.parquet", index=False)
        else:
            table.to_csv(folder / f"{name}.csv", index=False)
    return folder
