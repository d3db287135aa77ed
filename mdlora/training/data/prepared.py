"""The result of preparing a data setting: fitted encoder, encoded splits, domains, settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mdlora.formats.encoder import FeatureEncoder, LabeledArrays
from mdlora.models.features import FeatureSpec

__all__ = ["DataError", "PreparedData", "encode_splits", "labels_from"]


class DataError(ValueError):
    """The input data cannot be used as declared; the message says which column and why."""


@dataclass
class PreparedData:
    """Everything a training run needs from one data setting.

    ``train`` / ``val`` / ``test`` are :class:`~mdlora.formats.encoder.LabeledArrays` dicts (sparse,
    multi_hot, dense, domains, labels float32). ``divisions[0]`` is the primary division;
    ``domain_names[div]`` lists that division's domain names in id order. ``hparams`` holds the
    recommended hyper-parameters of the setting (keys: embed_dim, tower, dropout, lr,
    batch_size, l2, ... as the setting defines them).
    """

    name: str
    encoder: FeatureEncoder
    train: LabeledArrays
    val: LabeledArrays
    test: LabeledArrays
    divisions: list[str]
    domain_names: dict[str, list[str]]
    hparams: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    #: the training rows' values of the table's order column (``prepare_table(order_column=)``)
    train_order: np.ndarray | None = None

    @property
    def spec(self) -> FeatureSpec:
        return self.encoder.feature_spec()

    @property
    def primary_division(self) -> str:
        return self.divisions[0]

    def num_domains(self, division: str | None = None) -> int:
        return len(self.domain_names[division or self.divisions[0]])

    def split(self, name: str) -> LabeledArrays:
        """``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; use 'train', 'val' or 'test'")
        out: LabeledArrays = getattr(self, name)
        return out

    def summary(self) -> dict[str, Any]:
        """Row counts, positive rates and per-domain counts (JSON-serialisable)."""
        res: dict[str, Any] = {"name": self.name, "divisions": self.divisions}
        for part in ("train", "val", "test"):
            arr = self.split(part)
            n = int(arr["labels"].shape[0])
            per_dom: Any = (
                np.bincount(arr["domains"][:, 0], minlength=self.num_domains()) if n else []
            )
            res[part] = {
                "rows": n,
                "positive_rate": float(arr["labels"].mean()) if n else float("nan"),
                "rows_per_domain": [int(x) for x in per_dom],
            }
        return res


#: label strings read as booleans without a declaration (compared case-insensitively)
BOOLEAN_STRINGS = {"true": 1.0, "false": 0.0}
#: what YAML 1.1 reads as a boolean, for ``positive_labels: [yes]`` written unquoted
YAML_BOOL_WORDS = {True: ("true", "yes", "y", "on"), False: ("false", "no", "n", "off")}


def labels_from(
    values: pd.Series | np.ndarray,
    positive: Sequence[Any] | None = None,
    require_positive: bool = True,
) -> np.ndarray:
    """0/1 labels as float32, rejecting anything else with a clear message.

    Accepted without a declaration: booleans, the numbers 0 and 1 (also as text), and the
    strings true/false in any case. ``positive`` declares the label values that mean a click
    (e.g. ``["yes"]`` or ``["click", "purchase"]``); every other value is then a non-click,
    compared as stripped text, and missing values are refused. ``require_positive=False``
    accepts a part without any positive (one chunk of a streamed table; the caller checks the
    whole).
    """
    arr = np.asarray(values)
    series = pd.Series(arr)
    if series.isna().any():
        raise DataError(f"{int(series.isna().sum())} missing label value(s)")
    if positive is not None:
        if len(positive) == 0:
            raise DataError("positive_labels is empty: list the label value(s) that mean a click")
        wanted = {str(v).strip() for v in positive if not isinstance(v, bool)}
        # YAML reads an unquoted yes / on / true as the boolean True: match those spellings
        spelled = {w for v in positive if isinstance(v, bool) for w in YAML_BOOL_WORDS[v]}
        text = series.astype(str).str.strip()
        hit = (text.isin(wanted) | text.str.lower().isin(spelled)).to_numpy()
        if require_positive and not hit.any():
            shown = list(pd.unique(series.astype(str)))[:5]
            raise DataError(
                f"no label equals one of positive_labels {list(positive)}; values present, "
                f"e.g. {shown}"
            )
        return hit.astype(np.float32)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    num = pd.to_numeric(series, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    if arr.dtype == object:
        text = series.astype(str).str.strip().str.lower()
        num = np.where(np.isnan(num), text.map(BOOLEAN_STRINGS).to_numpy(np.float64), num)
    bad = ~np.isin(num, (0.0, 1.0))
    if bad.any():
        shown = list(pd.unique(pd.Series(arr[bad]).astype(str)))[:5]
        raise DataError(
            f"labels must be 0/1, booleans or true/false; found {int(bad.sum())} other "
            f"value(s), e.g. {shown}. If some of them mean a click, declare which in the "
            "table schema, e.g. positive_labels: [\"yes\"] (--positive-label for add-domain)"
        )
    return num.astype(np.float32)


def encode_splits(
    df: pd.DataFrame,
    encoder: FeatureEncoder,
    labels: np.ndarray,
    splits: Sequence[np.ndarray],
) -> tuple[LabeledArrays, LabeledArrays, LabeledArrays]:
    """Fit ``encoder`` on the train rows ONLY, then encode the three splits."""
    train_idx, val_idx, test_idx = splits
    encoder.fit(df.iloc[train_idx])
    out = []
    for idx in (train_idx, val_idx, test_idx):
        arr = encoder.transform(df.iloc[idx])
        out.append(
            LabeledArrays(
                sparse=arr["sparse"],
                multi_hot=arr["multi_hot"],
                dense=arr["dense"],
                domains=arr["domains"],
                labels=np.ascontiguousarray(labels[idx], dtype=np.float32),
            )
        )
    return out[0], out[1], out[2]
