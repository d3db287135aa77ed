from __future__ import annotations

import torch

from mdlora.models.features import DenseField, EncodedBatch, FeatureSpec, MultiHotField, SparseField
from mdlora.models.model import Division, ModelConfig, MultiDomainModel

SPEC = FeatureSpec(
    sparse=(SparseField("user", 60), SparseField("item", 40), SparseField("city", 7)),
    multi_hot=(MultiHotField("genres", 12, 3),),
    dense=(DenseField("age"),),
)
N_PRIMARY = 6
N_AUX = 2
METHODS = ["base", "mlora", "moe1", "moe3", "multilora"]


def make_config(backbone: str, method: str, **kw: object) -> ModelConfig:
    experts = 1
    if method.startswith("moe"):
        experts = int(method[3:])
        method = "moe"
    divisions = (
        Division("occupation", tuple(f"occ{i}" for i in range(N_PRIMARY))),
        Division("gender", ("F", "M")),
    )
    opts = dict(
        backbone=backbone, method=method, embed_dim=4, tower=(32, 16), dropout=0.0,
        experts_per_domain=experts, ranks=(4, 2), backbone_options={},
    )  # fmt: skip
    if backbone == "xdeepfm":
        opts["backbone_options"] = {"cin_layers": (8, 8)}
    if backbone == "autoint":
        opts["backbone_options"] = {"att_layers": 2, "heads": 2, "head_dim": 4}
    opts.update(kw)
    return ModelConfig(SPEC, divisions, **opts)  # type: ignore[arg-type]


def perturb(model: MultiDomainModel, scale: float = 0.1, seed: int = 0) -> MultiDomainModel:
    """Give every weight (adapters included, which start at zero) random non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return model


def make_batch(n: int = 300, n_primary: int = N_PRIMARY, seed: int = 1) -> EncodedBatch:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack(
        [torch.randint(0, f.vocab_size, (n,), generator=g) for f in SPEC.sparse], 1
    )
    multi_hot = torch.randint(-1, 12, (n, 1, 3), generator=g)
    dense = torch.rand(n, 1, generator=g)
    primary = torch.randint(0, n_primary, (n,), generator=g)
    domains = torch.stack([primary, torch.randint(0, N_AUX, (n,), generator=g)], 1)
    labels = torch.randint(0, 2, (n,), generator=g).float()
    return EncodedBatch(sparse, dense, domains, multi_hot, labels)

