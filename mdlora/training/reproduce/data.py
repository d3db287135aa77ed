"""MovieLens-1M loaded once per run and the prepared settings (and the held-out occupation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from mdlora.training.data.prepared import PreparedData


from mdlora.training.reproduce.grid import HOLDOUT_DOMAIN, Settings, Slice, check_data


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
            from mdlora.training.data.movielens import load_movielens_1m

            self._raw = load_movielens_1m(check_data(self.settings.data_dir))
        return self._raw

    def prepared(self, preset: str, sl: Slice) -> PreparedData:
        key = (preset, sl)
        if key not in self._prepared:
            from mdlora.training.data.presets import prepare_preset

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

    from mdlora.formats.encoder import FeatureEncoder
    from mdlora.training.data.prepared import PreparedData, encode_splits
    from mdlora.training.data.presets import MLORA_DIVISIONS, MLORA_HPARAMS
    from mdlora.training.data.splits import stratified_domain_split, subsample

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
