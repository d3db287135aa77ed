"""The result of preparing a data setting: fitted encoder, encoded splits, domains, settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mdlora.encoder import FeatureEncoder, LabeledArrays
from models.features import FeatureSpec

__all__ = ["PreparedData", "encode_splits", "labels_from"]


@dataclass
class PreparedData:
    """Everything a training run needs from one data setting.

    ``train`` / ``val`` / ``test`` are :class:`~mdlora.encoder.LabeledArrays` dicts (sparse,
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


def labels_from(values: pd.Series | np.ndarray) -> np.ndarray:
    """0/1 labels as float32, rejecting anything else with a clear message."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    num = pd.to_numeric(pd.Series(arr), errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = ~np.isin(num, (0.0, 1.0))
    if bad.any():
        shown = list(pd.unique(pd.Series(arr[bad]).astype(str)))[:5]
        raise ValueError(
            f"labels must be 0/1 (or boolean); found {int(bad.sum())} other value(s), e.g. {shown}"
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
