"""MovieLens-1M and MovieLens-100K loaders (GroupLens files, read by path, never copied).

Both return ONE DataFrame of ratings, in file order, joined with user and movie attributes:

``user_id, movie_id, rating, [timestamp], gender, age, occupation, zip, title, genres,
first_genre``

* ``genres`` is a list of genre names per row (the list object is shared by all ratings of a
  movie); ``first_genre`` is its first entry (``"unknown"`` when a movie has none).
* ML-1M: ``age`` is the official age CODE (1, 18, 25, 35, 45, 50, 56), ``occupation`` the code
  0..20. ML-100K: ``age`` is the age in years and ``occupation`` a name ("technician", ...).
* ``timestamp`` is present only when the ratings file has it (ML-1M ``ratings.dat``, ML-100K).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "ML1M_AGE_CODES",
    "ML100K_GENRES",
    "find_ml1m_ratings",
    "load_movielens_1m",
    "load_movielens_100k",
]

ML1M_AGE_CODES: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)
ML1M_RATING_FILES: tuple[str, ...] = ("ratings.dat", "ratings_no_timestamp.dat")
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def _read_double_colon(path: Path, names: list[str], dtypes: dict[str, str]) -> pd.DataFrame:
    """Read a ``::``-separated GroupLens file with pandas' C parser (latin-1)."""
    text = path.read_text(encoding="latin-1")
    # "::" is the only separator; a tab never occurs in these files, so the C engine can parse.
    text = text.replace("::", "\t")
    return pd.read_csv(
        io.StringIO(text),
        sep="\t",
        header=None,
        names=names,
        dtype=dtypes,
        quoting=3,  # csv.QUOTE_NONE: titles contain quote characters
        keep_default_na=False,
        engine="c",
    )


def find_ml1m_ratings(path: str | Path) -> Path:
    """The ratings file of an ML-1M folder (``ratings.dat`` or ``ratings_no_timestamp.dat``)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"MovieLens-1M folder not found: {p}")
    for name in ML1M_RATING_FILES:
        if (p / name).is_file():
            return p / name
    raise FileNotFoundError(
        f"no MovieLens-1M ratings file in {p}: expected one of {list(ML1M_RATING_FILES)} "
        "(get ml-1m.zip from https://grouplens.org/datasets/movielens/1m/)"
    )


def _genre_lists(genres: pd.Series, sep: str) -> pd.Series:
    return genres.map(lambda g: [x for x in str(g).split(sep) if x])


def load_movielens_1m(path: str | Path) -> pd.DataFrame:
    """Load MovieLens-1M from its folder (or from its ratings file, next to users/movies).

    Accepts both ratings layouts: ``UserID::MovieID::Rating::Timestamp`` (``ratings.dat``) and
    ``UserID::MovieID::Rating`` (``ratings_no_timestamp.dat``); the layout is detected from
    the first line, not the file name.
    """
    ratings_path = find_ml1m_ratings(path)
    folder = ratings_path.parent
    for name in ("users.dat", "movies.dat"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"MovieLens-1M file {name} not found in {folder}")
    with ratings_path.open("r", encoding="latin-1") as fh:
        first = fh.readline().strip()
    n_fields = len(first.split("::"))
    if n_fields == 4:
        names = ["user_id", "movie_id", "rating", "timestamp"]
    elif n_fields == 3:
        names = ["user_id", "movie_id", "rating"]
    else:
        raise ValueError(
            f"{ratings_path}: expected 3 or 4 '::'-separated fields per line, got {first!r}"
        )
    ratings = _read_double_colon(ratings_path, names, dict.fromkeys(names, "int64"))
    users = _read_double_colon(
        folder / "users.dat",
        ["user_id", "gender", "age", "occupation", "zip"],
        {"user_id": "int64", "gender": "str", "age": "int64", "occupation": "int64", "zip": "str"},
    )
    movies = _read_double_colon(
        folder / "movies.dat",
        ["movie_id", "title", "genres"],
        {"movie_id": "int64", "title": "str", "genres": "str"},
    )
    movies["genres"] = _genre_lists(movies["genres"], "|")
    return _join(ratings, users, movies)


def _join(ratings: pd.DataFrame, users: pd.DataFrame, movies: pd.DataFrame) -> pd.DataFrame:
    """Attach user and movie attributes to every rating, keeping the ratings' order."""
    movies = movies.copy()
    movies["first_genre"] = movies["genres"].map(lambda g: g[0] if len(g) else "unknown")
    df = ratings.reset_index(drop=True)
    u = users.set_index("user_id")
    m = movies.set_index("movie_id")
    missing_u = ~df["user_id"].isin(u.index)
    if missing_u.any():
        raise ValueError(
            f"{int(missing_u.sum())} ratings reference users absent from the users file"
        )
    missing_m = ~df["movie_id"].isin(m.index)
    if missing_m.any():
        raise ValueError(
            f"{int(missing_m.sum())} ratings reference movies absent from the movies file"
        )
    upos = u.index.get_indexer(pd.Index(df["user_id"]))
    mpos = m.index.get_indexer(pd.Index(df["movie_id"]))
    for col in ("gender", "age", "occupation", "zip"):
        df[col] = u[col].to_numpy()[upos]
    for col in ("title", "genres", "first_genre"):
        df[col] = m[col].to_numpy()[mpos]
    return df


def load_movielens_100k(path: str | Path) -> pd.DataFrame:
    """Load MovieLens-100K from its folder (``u.data``, ``u.user``, ``u.item``)."""
    folder = Path(path)
    for name in ("u.data", "u.user", "u.item"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"MovieLens-100K file {name} not found in {folder} "
                "(get ml-100k.zip from https://grouplens.org/datasets/movielens/100k/)"
            )
    ratings = pd.read_csv(
        folder / "u.data",
        sep="\t",
        header=None,
        names=["user_id", "movie_id", "rating", "timestamp"],
        dtype="int64",
    )
    users = pd.read_csv(
        folder / "u.user",
        sep="|",
        header=None,
        names=["user_id", "age", "gender", "occupation", "zip"],
        dtype={
            "user_id": "int64",
            "age": "int64",
            "gender": "str",
            "occupation": "str",
            "zip": "str",
        },
        keep_default_na=False,
    )
    genre_cols = [f"g{i}" for i in range(len(ML100K_GENRES))]
    items = pd.read_csv(
        folder / "u.item",
        sep="|",
        header=None,
        names=["movie_id", "title", "release_date", "video_release_date", "url", *genre_cols],
        encoding="latin-1",
        quoting=3,
        keep_default_na=False,
        dtype={"movie_id": "int64", "title": "str", **dict.fromkeys(genre_cols, "int64")},
    )
    flags = items[genre_cols].to_numpy(dtype=bool)
    names = np.array(ML100K_GENRES, dtype=object)
    items["genres"] = [list(names[row]) for row in flags]
    movies = items[["movie_id", "title", "genres"]]
    return _join(ratings, users[["user_id", "gender", "age", "occupation", "zip"]], movies)
