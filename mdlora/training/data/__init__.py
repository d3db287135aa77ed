"""The data layer: loaders, named settings, splits, synthetic data, streaming of large tables.

The feature encoder itself lives in :mod:`mdlora.formats.encoder` (shared with the service).
"""

from mdlora.formats.encoder import EncodedArrays, FeatureEncoder, LabeledArrays, MultiHotColumn
from mdlora.training.data.dataset import (
    shard_indices,
)
from mdlora.training.data.movielens import load_movielens_1m, load_movielens_100k
from mdlora.training.data.prepared import DataError, PreparedData, encode_splits, labels_from
from mdlora.training.data.presets import PRESETS, mlora_setting, multilora_setting, prepare_preset
from mdlora.training.data.splits import random_split, stratified_domain_split, subsample
from mdlora.training.data.synthetic import (
    make_synthetic,
    synthetic_schema,
    synthetic_setting,
    write_synthetic,
)
from mdlora.training.data.tabular import (
    TableSchema,
    iter_frames,
    prepare_table,
    read_table,
    validate_table,
)
from mdlora.training.data.taobao import load_taobao, taobao_setting, write_synthetic_taobao

__all__ = [
    "PRESETS",
    "DataError",
    "EncodedArrays",
    "FeatureEncoder",
    "LabeledArrays",
    "MultiHotColumn",
    "PreparedData",
    "TableSchema",
    "encode_splits",
    "iter_frames",
    "labels_from",
    "load_movielens_1m",
    "load_movielens_100k",
    "load_taobao",
    "make_synthetic",
    "mlora_setting",
    "multilora_setting",
    "prepare_preset",
    "prepare_table",
    "random_split",
    "read_table",
    "shard_indices",
    "stratified_domain_split",
    "subsample",
    "synthetic_schema",
    "synthetic_setting",
    "taobao_setting",
    "validate_table",
    "write_synthetic",
    "write_synthetic_taobao",
]
