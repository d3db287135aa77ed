"""The data layer: MovieLens loaders and settings, splits, synthetic data, Taobao layout,
user tables (in memory and streamed) and batch iteration."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch.utils.data import DistributedSampler

from mdlora.training.data import (
    DataError,
    TableSchema,
    labels_from,
    load_movielens_1m,
    load_movielens_100k,
    load_taobao,
    make_synthetic,
    mlora_setting,
    multilora_setting,
    prepare_preset,
    prepare_table,
    random_split,
    read_table,
    shard_indices,
    stratified_domain_split,
    synthetic_schema,
    taobao_setting,
    write_synthetic,
    write_synthetic_taobao,
)
from mdlora.training.data.presets import ml100k_age_codes
from mdlora.training.data.tabular import validate_table

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
ML1M = SHARED_DATA / "ml-1m"
ML100K = SHARED_DATA / "ml-100k"


@pytest.fixture(scope="module")
def ml1m() -> pd.DataFrame:
    if not ML1M.is_dir():
        pytest.skip(
            f"MovieLens-1M not found at {ML1M}: get ml-1m.zip from grouplens.org and unpack it "
            "there (it is not redistributable, so it is not in the repository)"
        )
    return load_movielens_1m(ML1M)


# ------------------------------------------------------------------ MovieLens loaders


def test_ml1m_counts(ml1m: pd.DataFrame) -> None:
    assert len(ml1m) == 1_000_209
    assert ml1m["user_id"].nunique() == 6_040
    assert ml1m["movie_id"].nunique() == 3_706
    assert ml1m["rating"].value_counts().sort_index().tolist() == [
        56_174, 107_557, 261_197, 348_971, 226_310,
    ]  # fmt: skip
    assert round(float((ml1m["rating"] == 5).mean()) * 100, 2) == 22.63
    users = ml1m.drop_duplicates("user_id")
    assert users["gender"].value_counts().to_dict() == {"M": 4_331, "F": 1_709}
    assert sorted(users["age"].unique().tolist()) == [1, 18, 25, 35, 45, 50, 56]
    assert sorted(users["occupation"].unique().tolist()) == list(range(21))
    # official first row, joined attributes, latin-1 titles
    first = ml1m.iloc[0]
    assert (first["user_id"], first["movie_id"], first["rating"]) == (1, 1193, 5)
    assert (first["gender"], first["age"], first["occupation"], first["zip"]) == (
        "F", 1, 10, "48067",
    )  # fmt: skip
    toy = ml1m.loc[ml1m["movie_id"] == 1].iloc[0]
    assert toy["genres"] == ["Animation", "Children's", "Comedy"]
    assert toy["first_genre"] == "Animation"


def _write_tiny_ml1m(folder: Path, with_timestamp: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n", "latin-1")
    (folder / "movies.dat").write_text(
        '1::Toy Story (1995)::Animation|Children\'s|Comedy\n2::Caf\xe9 "X" (1999)::Drama\n',
        "latin-1",
    )
    rows = ["1::1::5", "2::2::3", "2::1::4"]
    if with_timestamp:
        rows = [f"{r}::97830{i}" for i, r in enumerate(rows)]
    name = "ratings.dat" if with_timestamp else "ratings_no_timestamp.dat"
    (folder / name).write_text("\n".join(rows) + "\n", "latin-1")


@pytest.mark.parametrize("with_timestamp", [True, False])
def test_ml1m_accepts_both_ratings_layouts(tmp_path: Path, with_timestamp: bool) -> None:
    _write_tiny_ml1m(tmp_path / "ml", with_timestamp)
    df = load_movielens_1m(tmp_path / "ml")
    assert df["rating"].tolist() == [5, 3, 4]
    assert ("timestamp" in df.columns) is with_timestamp
    assert df["gender"].tolist() == ["F", "M", "M"]
    assert df["title"].tolist()[1] == 'Caf\xe9 "X" (1999)'
    with pytest.raises(FileNotFoundError, match="ratings"):
        load_movielens_1m(tmp_path)


def test_ml100k_counts() -> None:
    if not ML100K.is_dir():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (get ml-100k.zip from grouplens.org)")
    df = load_movielens_100k(ML100K)
    assert len(df) == 100_000
    assert df["user_id"].nunique() == 943
    assert df["movie_id"].nunique() == 1_682
    assert "timestamp" in df.columns
    toy = df.loc[df["movie_id"] == 1].iloc[0]
    assert toy["genres"] == ["Animation", "Children's", "Comedy"]
    assert toy["first_genre"] == "Animation"
    u1 = df.loc[df["user_id"] == 1].iloc[0]
    assert (u1["age"], u1["gender"], u1["occupation"], u1["zip"]) == (
        24,
        "M",
        "technician",
        "85711",
    )


# ------------------------------------------------------------------ MovieLens settings


def test_ml100k_ages_bucket_into_ml1m_codes() -> None:
    years = pd.Series([7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73])
    codes = [1, 1, 18, 18, 25, 25, 35, 35, 45, 45, 50, 50, 56, 56]
    assert ml100k_age_codes(years).tolist() == codes


def test_movielens_presets_take_an_ml100k_folder() -> None:
    if not ML100K.is_dir():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (get ml-100k.zip from grouplens.org)")
    raw = load_movielens_100k(ML100K)
    occ = prepare_preset("ml100k-mlora-occupation", ML100K, seed=3)
    assert occ.name == "ml100k-mlora-occupation"
    assert occ.domain_names["occupation"] == sorted(raw["occupation"].unique())
    assert len(occ.domain_names["occupation"]) == 21
    total = sum(len(p["labels"]) for p in (occ.train, occ.val, occ.test))
    assert total == 100_000
    positives = sum(float(p["labels"].sum()) for p in (occ.train, occ.val, occ.test))
    assert positives == float((raw["rating"] == 5).sum())
    # the ml1m-* names detect the layout, and a loaded 100K frame works like the folder
    age = prepare_preset("ml1m-mlora-age", raw, seed=3)
    assert age.name == "ml100k-mlora-age" and len(age.domain_names["age"]) == 7
    multi = prepare_preset("ml100k-multilora", ML100K)
    assert multi.domain_names == {"age_group": ["1-18", "25", "35-56"], "gender": ["F", "M"]}
    young = int((ml100k_age_codes(raw["age"]) <= 18).sum())
    splits = (multi.train, multi.val, multi.test)
    n_young = sum(int((p["domains"][:, 0] == 0).sum()) for p in splits)
    assert n_young == young


@pytest.mark.parametrize(
    ("division", "names"),
    [
        ("gender", ["F", "M"]),
        ("age", ["1", "18", "25", "35", "45", "50", "56"]),
        ("occupation", [str(i) for i in range(21)]),
    ],
)
def test_mlora_setting_splits(ml1m: pd.DataFrame, division: str, names: list[str]) -> None:
    prep = mlora_setting(ml1m, division, seed=7)
    assert prep.domain_names == {division: names}
    assert [f.name for f in prep.spec.sparse] == ["user_id", "movie_id", division]
    assert prep.hparams["embed_dim"] == 8 and prep.hparams["tower"] == [256, 128, 64]
    n_dom = len(names)
    # domain ids follow the declared order: e.g. age code 56 -> 6
    raw_dom = pd.Index(names).get_indexer(pd.Index(ml1m[division].astype(str)))
    counts = sum(
        np.bincount(p["domains"][:, 0], minlength=n_dom) for p in (prep.train, prep.val, prep.test)
    )
    assert np.array_equal(counts, np.bincount(raw_dom, minlength=n_dom))
    raw_pos = np.bincount(raw_dom, weights=(ml1m["rating"] == 5), minlength=n_dom)
    # per domain ~60/20/20, stratified on the label
    for d in range(n_dom):
        sizes = [int((p["domains"][:, 0] == d).sum()) for p in (prep.train, prep.val, prep.test)]
        total = sum(sizes)
        assert abs(sizes[0] / total - 0.6) < 0.01 and abs(sizes[1] / total - 0.2) < 0.01
        rate = raw_pos[d] / total
        for p in (prep.train, prep.val, prep.test):
            m = p["domains"][:, 0] == d
            assert abs(float(p["labels"][m].mean()) - rate) < 2.5 / max(m.sum(), 1) + 1e-3
    # the domain is also the third sparse field, with ids 1..n (0 = OOV)
    assert prep.spec.sparse[2].vocab_size == n_dom + 1
    assert prep.train["labels"].dtype == np.float32 and prep.train["sparse"].dtype == np.int64


def test_mlora_age_mapping_and_train_only_vocab(ml1m: pd.DataFrame) -> None:
    prep = mlora_setting(ml1m, "age", seed=3)
    enc = prep.encoder
    assert [enc.domain_id("age", c) for c in (1, 18, 25, 35, 45, 50, 56)] == list(range(7))
    # rebuild the split on the raw rows: the movie vocabulary comes from train rows only
    dom = pd.Index(["1", "18", "25", "35", "45", "50", "56"]).get_indexer(
        pd.Index(ml1m["age"].astype(str))
    )
    labels = (ml1m["rating"] == 5).to_numpy(np.float32)
    train_idx, _, test_idx = stratified_domain_split(dom, labels, (0.6, 0.2, 0.2), 3)
    train_movies = set(ml1m["movie_id"].iloc[train_idx].astype(str))
    assert set(enc.vocabs["movie_id"]) == train_movies
    test_only = set(ml1m["movie_id"].iloc[test_idx].astype(str)) - train_movies
    assert test_only, "expected some movies that appear only outside train"
    oov_rows = int((prep.test["sparse"][:, 1] == 0).sum())
    assert oov_rows == int(ml1m["movie_id"].iloc[test_idx].astype(str).isin(test_only).sum())
    # age codes map to domain ids in order: user 1 has age code 1, user 2 code 56
    for user, dom_id in (("1", 0), ("2", 6)):
        uid = enc.vocabs["user_id"].index(user) + 1
        rows = prep.train["sparse"][:, 0] == uid
        assert rows.any() and (prep.train["domains"][rows, 0] == dom_id).all()


def test_multilora_setting(ml1m: pd.DataFrame) -> None:
    users = ml1m.drop_duplicates("user_id")
    groups = users["age"].map({1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2})
    assert np.bincount(groups).tolist() == [1325, 2096, 2619]

    prep = multilora_setting(ml1m, with_genres=True, seed=1)
    assert prep.divisions == ["age_group", "gender"]
    assert prep.domain_names == {"age_group": ["1-18", "25", "35-56"], "gender": ["F", "M"]}
    spec = prep.spec
    assert [f.name for f in spec.sparse] == [
        "user_id", "movie_id", "gender", "occupation", "zip", "first_genre", "age_group",
    ]  # fmt: skip
    assert [f.name for f in spec.dense] == ["age"]
    assert [(m.name, m.max_len) for m in spec.multi_hot] == [("genres", 6)]
    n = [len(p["labels"]) for p in (prep.train, prep.val, prep.test)]
    assert sum(n) == 1_000_209
    assert abs(n[0] / sum(n) - 0.8) < 1e-3 and abs(n[1] / sum(n) - 0.1) < 1e-3
    all_labels = np.concatenate([p["labels"] for p in (prep.train, prep.val, prep.test)])
    assert abs(float(all_labels.mean()) - (348_971 + 226_310) / 1_000_209) < 1e-6
    age = prep.train["dense"][:, 0]
    assert age.min() == 0.0 and age.max() == 1.0
    # rows per natural domain, in users' rating counts
    dom_rows = sum(
        np.bincount(p["domains"][:, 0], minlength=3) for p in (prep.train, prep.val, prep.test)
    )
    expected = np.bincount(ml1m["age"].map({1: 0, 18: 0, 25: 1}).fillna(2).astype(int))
    assert np.array_equal(dom_rows, expected)

    small = multilora_setting(ml1m, max_rows=20_000, seed=1)
    assert sum(len(p["labels"]) for p in (small.train, small.val, small.test)) == 20_000
    assert small.spec.multi_hot == ()


# ------------------------------------------------------------------ splits


def test_stratified_split_small_domains_and_determinism() -> None:
    rng = np.random.default_rng(0)
    dom = np.r_[np.zeros(1000, int), np.ones(2, int), np.full(7, 2), np.full(50, 3)]
    lab = rng.random(dom.size) < 0.3
    lab[-50:] = False
    lab[-1] = True  # domain 3: a single positive -> cannot stratify, must not crash
    a = stratified_domain_split(dom, lab, (0.6, 0.2, 0.2), seed=5)
    b = stratified_domain_split(dom, lab, (0.6, 0.2, 0.2), seed=5)
    c = stratified_domain_split(dom, lab, (0.6, 0.2, 0.2), seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    allidx = np.sort(np.concatenate(a))
    assert np.array_equal(allidx, np.arange(dom.size))  # a partition
    assert np.isin(np.flatnonzero(dom == 1), a[0]).all()  # 2-row domain kept in train
    assert (dom[a[2]] == 2).sum() >= 1 and (dom[a[1]] == 2).sum() >= 1
    tr, va, te = random_split(1000, (0.8, 0.1, 0.1), seed=0)
    assert (len(tr), len(va), len(te)) == (800, 100, 100)


# ------------------------------------------------------------------ synthetic


def test_synthetic_determinism_speed_and_domain_effect(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    df = make_synthetic(100_000, n_domains=4, seed=3, return_truth=True)
    assert time.perf_counter() - t0 < 2.0
    assert list(df.columns[:8]) == [
        "user_id", "item_id", "user_segment", "item_category", "tags", "price", "domain", "label",
    ]  # fmt: skip
    assert sorted(df["domain"].unique()) == ["d0", "d1", "d2", "d3"]
    assert abs(df["label"].mean() - 0.3) < 0.01
    pd.testing.assert_frame_equal(
        df, make_synthetic(100_000, n_domains=4, seed=3, return_truth=True)
    )
    assert not df["label"].equals(make_synthetic(100_000, n_domains=4, seed=4)["label"])
    # the known domain effect is large: the true probability ranks far better than the same
    # model without the domain-specific terms
    auc_true = roc_auc_score(df["label"], df["p_true"])
    auc_shared = roc_auc_score(df["label"], df["p_no_domain_effect"])
    assert auc_true > auc_shared + 0.05
    # ... and a learner with domain-specific parameters beats one without
    train, test = df.iloc[:70_000], df.iloc[70_000:]

    def design(part: pd.DataFrame, per_domain: bool) -> pd.DataFrame:
        cell = part["user_segment"] + "_" + part["item_category"]
        if per_domain:
            cell = part["domain"] + "_" + cell
        x = pd.get_dummies(cell).astype(np.float32)
        price = part["price"] - 0.5
        slopes = (
            pd.get_dummies(part["domain"]).astype(np.float32).mul(price, axis=0)
            if per_domain
            else price.to_frame()
        )
        return pd.concat([x, slopes.add_prefix("p_")], axis=1)

    aucs = {}
    for per_domain in (False, True):
        xtr = design(train, per_domain)
        xte = design(test, per_domain).reindex(columns=xtr.columns, fill_value=0.0)
        model = LogisticRegression(max_iter=300).fit(xtr.to_numpy(), train["label"])
        aucs[per_domain] = roc_auc_score(test["label"], model.predict_proba(xte.to_numpy())[:, 1])
    assert aucs[True] > aucs[False] + 0.03, aucs

    path = write_synthetic(tmp_path / "syn.parquet", n_rows=1000, seed=1)
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, make_synthetic(n_rows=1000, seed=1))
    csv = write_synthetic(tmp_path / "syn.csv", n_rows=500, seed=1)
    assert len(pd.read_csv(csv)) == 500


# ------------------------------------------------------------------ Taobao


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_taobao_synthetic_layout(tmp_path: Path, fmt: str) -> None:
    folder = write_synthetic_taobao(tmp_path / "taobao", fmt=fmt, dim=16, seed=2)
    raw = load_taobao(folder)
    clicks = raw["clicks"]
    assert clicks is not None
    first_seen = [str(t) for t in dict.fromkeys(clicks.sort_values("timestamp")["theme_id"])]
    prep = taobao_setting(folder, n_domains=10, seed=4)
    names = prep.domain_names["theme_id"]
    assert names == first_seen[:10]
    assert names != sorted(names)  # first appearance, not sorted order
    assert prep.num_domains() == 10
    assert [f.name for f in prep.spec.dense][:2] == ["uvec_0", "uvec_1"]
    assert len(prep.spec.dense) == 32
    parts = (prep.train, prep.val, prep.test)
    n = np.array([len(p["labels"]) for p in parts])
    assert np.allclose(n / n.sum(), [0.6, 0.2, 0.2], atol=0.01)
    # per theme: click rate near the drawn target CTR, every theme present in every split
    labels = np.concatenate([p["labels"] for p in parts])
    doms = np.concatenate([p["domains"][:, 0] for p in parts])
    for d, theme in enumerate(names):
        ctr = prep.info["target_ctr"][theme]
        assert 0.2 <= ctr <= 0.5
        assert abs(labels[doms == d].mean() - ctr) < 0.05
        assert all((p["domains"][:, 0] == d).any() for p in parts)
    assert taobao_setting(folder, n_domains=20, seed=4).num_domains() == 20
    with pytest.raises(ValueError, match="only 35"):
        taobao_setting(folder, n_domains=40)


def test_taobao_negatives_exclude_positives(tmp_path: Path) -> None:
    from mdlora.training.data.taobao import build_taobao_frame

    folder = write_synthetic_taobao(tmp_path / "t", dim=4, seed=5)
    clicks = load_taobao(folder)["clicks"]
    assert clicks is not None
    frame, themes, _ = build_taobao_frame(clicks, n_domains=10, seed=0)
    pos = frame[frame["label"] == 1]
    neg = frame[frame["label"] == 0]
    key = ["user_id", "item_id", "theme_id"]
    assert not neg.merge(pos[key], on=key).shape[0]  # no negative is a user's positive
    assert not neg.duplicated(key).any()
    # negatives come from the theme's own item pool
    for t in themes[:3]:
        pool = set(pos.loc[pos["theme_id"] == t, "item_id"])
        assert set(neg.loc[neg["theme_id"] == t, "item_id"]) <= pool


# ------------------------------------------------------------------ user tables


def test_tabular_schema_errors_name_the_column(tmp_path: Path) -> None:
    df = make_synthetic(500, seed=0)
    path = tmp_path / "t.csv"
    df.drop(columns=["price"]).to_csv(path, index=False)
    schema = synthetic_schema()
    with pytest.raises(ValueError, match=r"\['price'\].*columns present.*'user_id'"):
        read_table(path, schema)
    with pytest.raises(ValueError, match=r"\['price'\]"):
        prepare_table(df.drop(columns=["price"]), schema)
    bad = df.assign(label=df["label"] * 2)
    with pytest.raises(ValueError, match=r"label column 'label'.*0/1"):
        prepare_table(bad, schema)
    with pytest.raises(ValueError, match="at least one division"):
        TableSchema(label="label", divisions=[], sparse=["user_id"])


def test_labels_accept_text_booleans_and_declared_positives() -> None:
    assert labels_from(pd.Series(["TRUE", "false", " True "])).tolist() == [1.0, 0.0, 1.0]
    assert labels_from(pd.Series(["1", "0", 1])).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(DataError, match=r'positive_labels: \["yes"\]'):
        labels_from(pd.Series(["yes", "no"]))
    assert labels_from(pd.Series(["yes", "no", " yes"]), ["yes"]).tolist() == [1.0, 0.0, 1.0]
    views = pd.Series(["click", "view", "buy"])
    assert labels_from(views, ["click", "buy"]).tolist() == [1.0, 0.0, 1.0]
    # YAML reads an unquoted `yes` as True: it still matches the text "yes" / "Yes"
    assert labels_from(pd.Series(["Yes", "no"]), [True]).tolist() == [1.0, 0.0]
    with pytest.raises(DataError, match=r"no label equals one of positive_labels \['Y'\]"):
        labels_from(pd.Series(["yes", "no"]), ["Y"])
    with pytest.raises(DataError, match="1 missing label"):
        labels_from(pd.Series([1.0, None, 0.0]))


def test_table_with_text_labels_trains_through_the_schema(tmp_path: Path) -> None:
    df = make_synthetic(600, seed=0)
    df["label"] = np.where(df["label"] == 1, "yes", "no")
    raw = {**synthetic_schema().to_dict(), "positive_labels": ["yes"]}
    prep = prepare_table(df, TableSchema.from_dict(raw), seed=0)
    n_pos = sum(int(p["labels"].sum()) for p in (prep.train, prep.val, prep.test))
    assert n_pos == int((df["label"] == "yes").sum())
    with pytest.raises(DataError, match=r"'positive_label' \(did you mean 'positive_labels'\?\)"):
        TableSchema.from_dict({**raw, "positive_label": ["yes"]})
    with pytest.raises(DataError, match=r"needs \['label'\]"):
        TableSchema.from_dict({"divisions": ["domain"], "sparse": ["user_id"]})


def test_tabular_csv_keeps_text_ids_and_prepares(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "zip": ["02134", "2134", "02134", "99999"] * 50,
            "shop": ["a", "b", "c", "d"] * 50,
            "genres": ["x|y", "y", "", "z|x"] * 50,
            "score": np.linspace(0, 1, 200),
            "market": ["us", "uk"] * 100,
            "clicked": [True, False, False, True] * 50,
        }
    )
    path = tmp_path / "mine.csv"
    df.to_csv(path, index=False)
    schema = TableSchema(
        label="clicked", divisions=["market"], sparse=["zip", "shop", "market"],
        multi_hot=["genres"], dense=["score"],
    )  # fmt: skip
    prep = prepare_table(path, schema, seed=0)
    assert set(prep.encoder.vocabs["zip"]) == {"02134", "2134", "99999"}  # text kept verbatim
    assert prep.domain_names == {"market": ["uk", "us"]}
    assert prep.name == "mine"
    n = sum(len(p["labels"]) for p in (prep.train, prep.val, prep.test))
    assert n == 200
    assert set(np.unique(prep.train["labels"])) == {0.0, 1.0}


def test_streaming_a_table_matches_in_memory(tmp_path: Path) -> None:
    """Parquet (a list column too) and CSV, read chunk by chunk, give the in-memory data."""
    from mdlora.training.data.streaming import prepare_table_stream

    df = make_synthetic(20_000, seed=9)
    df["tag_list"] = df["tags"].str.split("|")  # a real Parquet list column
    path = tmp_path / "big.parquet"
    df.to_parquet(path, row_group_size=3_000)
    schema = synthetic_schema()
    schema.multi_hot = ["tags", "tag_list"]
    in_memory = prepare_table(path, schema, seed=4)
    streamed = prepare_table_stream(path, schema, seed=4, batch_rows=2_500, progress=False)
    assert streamed.encoder.to_dict() == in_memory.encoder.to_dict()
    for part in ("train", "val", "test"):
        for key in ("sparse", "multi_hot", "dense", "domains", "labels"):
            a, b = getattr(in_memory, part)[key], getattr(streamed, part)[key]
            assert np.array_equal(a, b), (part, key)
    mh = streamed.train["multi_hot"]
    assert mh is not None
    assert np.array_equal(mh[:, 0], mh[:, 1])  # "a|b" strings == Parquet lists
    # CSV streams the same way
    csv = tmp_path / "big.csv"
    df.drop(columns=["tag_list"]).to_csv(csv, index=False)
    schema.multi_hot = ["tags"]
    csv_streamed = prepare_table_stream(csv, schema, seed=4, batch_rows=4_000, progress=False)
    assert np.array_equal(csv_streamed.train["sparse"], streamed.train["sparse"])


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize(("shuffle", "drop_last"), [(True, False), (False, False), (True, True)])
def test_sharding_matches_distributed_sampler(shuffle: bool, drop_last: bool) -> None:
    n, ws = 1003, 4
    for rank in range(ws):
        sampler: DistributedSampler[int] = DistributedSampler(
            range(n),  # type: ignore[arg-type]
            num_replicas=ws,
            rank=rank,
            shuffle=shuffle,
            seed=11,
            drop_last=drop_last,
        )
        sampler.set_epoch(2)
        ours = shard_indices(
            n, shuffle=shuffle, seed=11, epoch=2, rank=rank, world_size=ws, drop_last=drop_last
        )
        assert ours.tolist() == list(sampler)
    sizes = [len(shard_indices(n, shuffle=True, rank=r, world_size=ws)) for r in range(ws)]
    assert sizes == [251] * ws  # padded like DistributedSampler: equal work per rank


def test_dense_columns_with_text_or_infinities_are_refused() -> None:
    schema = TableSchema(label="label", divisions=["d"], sparse=["u"], dense=["age"])
    frame = pd.DataFrame({"label": [0, 1, 0], "d": ["a", "a", "b"], "u": [1, 2, 3]})
    validate_table(frame.assign(age=[1.0, np.nan, 3.0]), schema)  # missing values are fine
    validate_table(frame.assign(age=["1", "", " NaN "]), schema)  # and so is text for missing
    validate_table(frame.assign(age=pd.array([1, None, 3], dtype="Int64")), schema)
    with pytest.raises(DataError, match=r"'age' has 1 value\(s\) that are not numbers.*'old'"):
        validate_table(frame.assign(age=["1", "old", "3"]), schema)
    with pytest.raises(DataError, match="'age' has 2 infinite"):
        validate_table(frame.assign(age=[1.0, np.inf, -np.inf]), schema)


def test_empty_and_unreadable_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet cannot be read as Parquet"):
        read_table(tmp_path / "bad.parquet")


def test_taobao_feature_frame_and_data_errors(tmp_path: Path) -> None:
    from mdlora.training.data.taobao import taobao_feature_frame

    folder = write_synthetic_taobao(tmp_path / "t", n_themes=12, dim=4, seed=5)
    frame = taobao_feature_frame(folder)
    assert {"user_id", "item_id", "theme_id", "uvec_0", "uvec_3", "ivec_0"} <= set(frame.columns)
    assert frame["uvec_0"].notna().all() and frame["ivec_3"].notna().all()
    with pytest.raises(DataError, match="clicks hold only 12"):
        taobao_setting(folder, n_domains=20)
    clicks = pd.read_parquet(folder / "clicks.parquet").drop(columns=["theme_id"])
    clicks.to_parquet(folder / "clicks.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['theme_id'\]"):
        load_taobao(folder)
