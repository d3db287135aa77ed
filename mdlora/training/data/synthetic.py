"""A synthetic multi-domain CTR data set with KNOWN domain effects.

Click probability of a row (user u, item i, domain d)::

    logit = b0 + shared(u, i, price, tags) + bias[d]
            + domain_strength * ( M[d, segment(u), category(i)] + 2 * slope[d] * (price - 0.5) )

* ``shared``: user and item biases, a rank-4 user x item affinity, tag weights and a common
  price slope -- what a single shared model can learn.
* ``M[d]``: a per-domain segment x category interaction table, ``slope[d]``: a per-domain
  price slope. Averaged over domains these effects mostly cancel, so a model without
  domain-specific parameters cannot fit them; a per-domain adapter can. ``domain_strength=0``
  removes them (then adapters should not help).
* ``b0`` is solved so that the mean click rate is ``target_ctr``.

Domains are drawn per row (a scenario, not a user property), with unequal sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdlora.training.data.prepared import PreparedData
from mdlora.training.data.tabular import TableSchema, prepare_table

__all__ = [
    "make_amazon_like",
    "make_new_domain",
    "make_synthetic",
    "synthetic_schema",
    "synthetic_setting",
    "write_movielens_1m_like",
    "write_synthetic",
]


def synthetic_schema() -> TableSchema:
    """The :class:`TableSchema` of :func:`make_synthetic`'s columns."""
    return TableSchema(
        label="label",
        divisions=["domain"],
        sparse=["user_id", "item_id", "user_segment", "item_category", "domain"],
        multi_hot=["tags"],
        dense=["price"],
        multi_hot_delimiter="|",
        multi_hot_max_len=4,
    )


def _solve_intercept(logit: np.ndarray, target: float) -> float:
    """b such that mean(sigmoid(logit + b)) == target (bisection; monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def make_synthetic(
    n_rows: int = 100_000,
    n_users: int = 2_000,
    n_items: int = 1_000,
    n_domains: int = 4,
    *,
    n_segments: int = 6,
    n_categories: int = 8,
    n_tags: int = 20,
    max_tags: int = 3,
    domain_strength: float = 1.5,
    target_ctr: float = 0.3,
    seed: int = 0,
    return_truth: bool = False,
) -> pd.DataFrame:
    """Generate the data set (deterministic for a given seed and arguments).

    Columns: ``user_id`` (int), ``item_id`` (int), ``user_segment`` ("s0".., a function of the
    user), ``item_category`` ("c0".., a function of the item), ``tags`` ("t3|t7", 1..max_tags
    per item), ``price`` (float in [0, 1]), ``domain`` ("d0".."d{k-1}"), ``label`` (0/1 int8);
    with ``return_truth`` also ``p_true``, the true click probability, and
    ``p_no_domain_effect``, the same without the domain-specific interaction terms.
    """
    if min(n_rows, n_users, n_items, n_domains, n_segments, n_categories, n_tags, max_tags) < 1:
        raise ValueError("all sizes must be >= 1")
    rng = np.random.default_rng(seed)
    # entity attributes
    user_seg = rng.integers(0, n_segments, n_users)
    item_cat = rng.integers(0, n_categories, n_items)
    user_bias = rng.normal(0.0, 0.5, n_users)
    item_bias = rng.normal(0.0, 0.5, n_items)
    user_vec = rng.normal(0.0, 0.5, (n_users, 4))
    item_vec = rng.normal(0.0, 0.5, (n_items, 4))
    item_price = rng.beta(2.0, 2.0, n_items)
    tag_weight = rng.normal(0.0, 0.4, n_tags)
    n_item_tags = rng.integers(1, max_tags + 1, n_items)
    tag_ids = np.argsort(rng.random((n_items, n_tags)), axis=1)[:, :max_tags]  # distinct tags
    tag_mask = np.arange(max_tags)[None, :] < n_item_tags[:, None]
    item_tag_effect = (tag_weight[tag_ids] * tag_mask).sum(1) / n_item_tags
    tag_names = np.array([f"t{t}" for t in range(n_tags)], dtype=object)
    item_tags = np.array(
        ["|".join(tag_names[tag_ids[i, : n_item_tags[i]]]) for i in range(n_items)], dtype=object
    )
    # domain effects (the part a shared model cannot capture)
    dom_p = rng.dirichlet(np.full(n_domains, 3.0))
    dom_bias = rng.normal(0.0, 0.5, n_domains)
    dom_table = rng.normal(0.0, 1.0, (n_domains, n_segments, n_categories))
    dom_table -= dom_table.mean(0, keepdims=True) if n_domains > 1 else 0.0
    dom_slope = rng.normal(0.0, 1.0, n_domains)
    # rows
    u = rng.integers(0, n_users, n_rows)
    i = rng.integers(0, n_items, n_rows)
    d = rng.choice(n_domains, size=n_rows, p=dom_p)
    price = item_price[i]
    shared = (
        user_bias[u]
        + item_bias[i]
        + (user_vec[u] * item_vec[i]).sum(1) * 2.0
        + item_tag_effect[i]
        + 0.5 * (price - 0.5)
    )
    specific = dom_table[d, user_seg[u], item_cat[i]] + 2.0 * dom_slope[d] * (price - 0.5)
    logit = shared + dom_bias[d] + domain_strength * specific
    b0 = _solve_intercept(logit, target_ctr)
    logit = logit + b0
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n_rows) < p).astype(np.int8)
    seg_names = np.array([f"s{k}" for k in range(n_segments)], dtype=object)
    cat_names = np.array([f"c{k}" for k in range(n_categories)], dtype=object)
    dom_names = np.array([f"d{k}" for k in range(n_domains)], dtype=object)
    df = pd.DataFrame(
        {
            "user_id": u.astype(np.int64),
            "item_id": i.astype(np.int64),
            "user_segment": seg_names[user_seg[u]],
            "item_category": cat_names[item_cat[i]],
            "tags": item_tags[i],
            "price": price.astype(np.float64),
            "domain": dom_names[d],
            "label": label,
        }
    )
    if return_truth:
        df["p_true"] = p
        df["p_no_domain_effect"] = 1.0 / (1.0 + np.exp(-(shared + dom_bias[d] + b0)))
    return df


def make_new_domain(
    name: str = "d_new",
    n_rows: int = 12_000,
    n_users: int = 400,
    n_items: int = 150,
    *,
    id_offset: int = 1_000_000,
    seed: int = 7,
    **kwargs: Any,
) -> pd.DataFrame:
    """Rows of one NEW domain whose users and items are new: ids from ``id_offset`` up, which
    no :func:`make_synthetic` data set of fewer users/items has (the columns are the same).

    Most of the signal is in the ids (user and item biases and affinities), so a model that
    knows none of them scores the domain near AUC 0.5 until it grows rows for them
    (``mdlora add-domain``).
    """
    df = make_synthetic(n_rows, n_users, n_items, n_domains=1, seed=seed, **kwargs)
    return df.assign(
        user_id=df["user_id"] + id_offset, item_id=df["item_id"] + id_offset, domain=name
    )


def make_amazon_like(
    domains: tuple[str, ...] = ("sports", "toys", "office"),
    users: tuple[int, ...] = (120, 80, 40),
    items: int = 60,
    history: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """A small table in the layout of ``../shared/data/amazon2014-3domain-dev``: users and
    items distinct per domain (``"toys:u3"``, ``"toys:i7"``), every interaction a positive
    with one sampled negative, ``seq_pos`` and a leave-last-out ``split`` per user.

    Positives follow user x item affinities and item popularity (so ids carry the signal);
    negatives are uniform over the domain's items. For tests of the real-data experiments.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for dom, n_users in zip(domains, users, strict=True):
        pop = rng.normal(0.0, 1.0, items)
        u_vec, i_vec = rng.normal(0, 1, (n_users, 4)), rng.normal(0, 1, (items, 4))
        logits = u_vec @ i_vec.T + 1.5 * pop[None, :]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for u in range(n_users):
            pos = rng.choice(items, size=history, p=p[u])
            neg = rng.integers(0, items, history)
            n = 2 * history
            seq = np.repeat(np.arange(history), 2)
            split = np.where(
                seq == history - 1, "test", np.where(seq == history - 2, "val", "train")
            )
            parts.append(pd.DataFrame({
                "user": f"{dom}:u{u}",
                "item": [f"{dom}:i{i}" for pair in zip(pos, neg, strict=True) for i in pair],
                "domain": dom, "activeness": "active" if u % 3 == 0 else "casual",
                "seq_pos": seq.astype(np.int32), "label": np.tile([1, 0], history).astype(np.int8),
                "split": split,
            }, index=range(n)))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def write_synthetic(path: str | Path, **kwargs: object) -> Path:
    """Write :func:`make_synthetic` (same keyword arguments) to ``.parquet`` or ``.csv``."""
    p = Path(path)
    df = make_synthetic(**kwargs)  # type: ignore[arg-type]
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() in (".parquet", ".pq"):
        df.to_parquet(p, index=False)
    elif p.suffix.lower() == ".csv" or p.name.lower().endswith(".csv.gz"):
        df.to_csv(p, index=False)
    else:
        raise ValueError(f"unsupported suffix for {p}: use .parquet or .csv")
    return p


def synthetic_setting(
    n_rows: int = 100_000,
    n_domains: int = 4,
    *,
    seed: int = 0,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    **kwargs: object,
) -> PreparedData:
    """The synthetic data as :class:`PreparedData` (per-domain stratified split)."""
    df = make_synthetic(n_rows=n_rows, n_domains=n_domains, seed=seed, **kwargs)  # type: ignore[arg-type]
    prepared = prepare_table(
        df,
        synthetic_schema(),
        split=split,
        seed=seed,
        name=f"synthetic-{n_domains}",
        hparams={
            "embed_dim": 8,
            "tower": [128, 64],
            "dropout": 0.0,
            "optimizer": "adam",
            "lr": 1e-3,
            "batch_size": 1024,
            "l2": 1e-6,
        },
    )
    return prepared


def write_movielens_1m_like(
    folder: str | Path,
    n_users: int = 600,
    n_movies: int = 400,
    n_ratings: int = 40_000,
    seed: int = 0,
) -> Path:
    """Write a small data set in MovieLens-1M's exact file layout (``users.dat``,
    ``movies.dat``, ``ratings.dat``, ``::``-separated, latin-1), with random users of every
    gender, age code and occupation, and ratings that depend on user, movie and the user's
    gender x the movie's first genre (so per-domain effects exist).

    For trying the ML-1M presets and ``mdlora reproduce`` where the real files are not at
    hand (they cannot be redistributed); it is NOT MovieLens: its numbers mean nothing.
    """
    from mdlora.training.data.movielens import ML1M_AGE_CODES, ML100K_GENRES

    genre_names = ML100K_GENRES[1:]  # ML-1M's 18 genres (ML-100K adds "unknown")

    rng = np.random.default_rng(seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    users = pd.DataFrame({
        "user_id": np.arange(1, n_users + 1),
        "gender": rng.choice(["F", "M"], n_users, p=[0.3, 0.7]),
        "age": np.resize(ML1M_AGE_CODES, n_users)[rng.permutation(n_users)],
        "occupation": np.resize(np.arange(21), n_users)[rng.permutation(n_users)],
        "zip": [f"{z:05d}" for z in rng.integers(0, 99_999, n_users)],
    })  # fmt: skip
    genres = [
        "|".join(rng.choice(genre_names, rng.integers(1, 4), replace=False))
        for _ in range(n_movies)
    ]
    movies = pd.DataFrame({
        "movie_id": np.arange(1, n_movies + 1),
        "title": [f"Movie {i} (19{70 + i % 30})" for i in range(1, n_movies + 1)],
        "genres": genres,
    })  # fmt: skip
    u = rng.integers(0, n_users, n_ratings)
    m = rng.integers(0, n_movies, n_ratings)
    first = np.array([genre_names.index(g.split("|")[0]) for g in genres])
    taste = rng.normal(0, 1.0, (2, len(genre_names)))  # gender x genre
    female = (users["gender"].to_numpy() == "F").astype(int)
    score = (rng.normal(0, 0.7, n_users)[u] + rng.normal(0, 0.7, n_movies)[m]
             + taste[female[u], first[m]] + rng.normal(0, 0.8, n_ratings))  # fmt: skip
    rating = np.clip(np.round(3.6 + score), 1, 5).astype(int)
    ratings = pd.DataFrame({
        "user_id": u + 1, "movie_id": m + 1, "rating": rating,
        "timestamp": 978_300_000 + rng.integers(0, 10_000_000, n_ratings),
    })  # fmt: skip
    for name, frame in (("users.dat", users), ("movies.dat", movies), ("ratings.dat", ratings)):
        lines = ["::".join(str(v) for v in row) for row in frame.itertuples(index=False)]
        (out / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    return out
