"""The adapter-and-gate core: eight CTR backbones plus an MLP, MLoRA adapters, MoE-MLoRA experts
and gate, MultiLoRA scaled adapters, domain norm and fusion (pure PyTorch).

The usual entry points::

    from mdlora.models import Division, EncodedBatch, FeatureSpec, ModelConfig, MultiDomainModel
    from mdlora.models import DenseField, MultiHotField, SparseField
"""

from mdlora.models.features import DenseField, EncodedBatch, FeatureSpec, MultiHotField, SparseField
from mdlora.models.model import Division, ModelConfig, MultiDomainModel

__all__ = [
    "DenseField",
    "Division",
    "EncodedBatch",
    "FeatureSpec",
    "ModelConfig",
    "MultiDomainModel",
    "MultiHotField",
    "SparseField",
]
