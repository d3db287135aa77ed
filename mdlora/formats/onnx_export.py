"""The ONNX Runtime scoring path: export a model's scorer, and run it with onnxruntime.

The exported graph takes the features **and the adapter banks** as inputs::

    sparse      [B, n_sparse]  int64      ids, 0 = out of vocabulary
    dense       [B, n_dense]   float32
    domains     [B, n_div]     int64      column 0 routes the banks
    multi_hot   [B, M, L]      int64      -1 padded (only if the spec has multi-hot fields)
    bank_{i}_a  [D, in_i, R_i] float32    per tower layer i, from ``model.folded_banks()``
    bank_{i}_b  [D, R_i, out_i]
    bank_{i}_c  [D, out_i]
    -> probs    [B]            float32    sigmoid of the logits

``B``, ``D`` (domains), ``L`` and the ranks ``R_i`` are dynamic, so a domain registered after
export is served by feeding the grown banks: no re-export (``R_i`` because MoE-MLoRA's
folded rank can widen when a domain is added). The banks are the per-domain *effective*
adapters (for MoE-MLoRA the gate is folded in per domain), routed with the ``gather``
strategy of :class:`mdlora.models.lora.InferenceBank`: plain Gather / MatMul operators. The torch
scorer's ``embedding_bag`` does export, but as an ONNX ``Loop`` over the samples (about 30x
slower), so MultiLoRA's LoRA sets are traced with gathers too.

Which stage has bank inputs:

* ``adapters`` (MLoRA) and ``gate`` (MoE-MLoRA): yes, as above;
* ``backbone`` (any method), ``lora`` and ``fusion`` (MultiLoRA): no. MultiLoRA is exported
  with its LoRA sets, domain norms and fusion **baked in** as constants: its forward pass
  needs two divisions' LoRA outputs and an attention over them, not one effective adapter
  per domain, so a MultiLoRA model that gained a domain is exported again;
* ``expert`` (an MoE training stage: one expert for every sample) cannot be exported.

The exporter is torch's ``dynamo=True`` path (``torch.export`` + onnxscript). The TorchScript
exporter (``dynamo=False``) also runs on these models, but its ``dynamic_axes`` only name
axes; ``torch.export`` takes them as ``Dim`` objects and refuses a trace that specialises on
one, so a graph that would only work for the traced number of domains fails at export time,
not in production. It is also the exporter torch maintains. Each export is checked: the
written graph is run by onnxruntime and compared with ``model.forward``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mdlora.formats.fileio import staging_dir
from mdlora.formats.files import model_signature
from mdlora.models.lora import InferenceBank
from mdlora.models.model import MultiDomainModel

log = logging.getLogger(__name__)

BANK_STAGES = ("adapters", "gate")
BAKED_STAGES = ("backbone", "lora", "fusion")
# Above this many bytes of weights the graph is saved with an external ``<file>.data``
# (protobuf cannot hold more than 2 GiB).
EXTERNAL_DATA_BYTES = 1_500_000_000
FEATURE_INPUTS = ("sparse", "dense", "domains", "multi_hot")
OUTPUT = "probs"

NumpyBank = tuple[np.ndarray, np.ndarray, np.ndarray]
ArrayLike = np.ndarray | Tensor


class OnnxExportError(ValueError):
    """The model cannot be exported, or the exported graph does not reproduce it."""


class OnnxInputError(ValueError):
    """Inputs given to :meth:`OnnxScorer.score` do not fit the exported graph."""


def has_bank_inputs(model: MultiDomainModel) -> bool:
    """Whether the model's current stage is exported with the adapter banks as inputs."""
    return model.stage.name in BANK_STAGES


def bank_input_names(layers: int) -> list[str]:
    return [f"bank_{i}_{part}" for i in range(layers) for part in ("a", "b", "c")]


class _Scorer(nn.Module):
    """What the ONNX graph computes: ``probs = sigmoid(model(features, banks))``.

    With bank inputs, the composition of ``MultiDomainModel.forward`` is repeated here with a
    :class:`Route` built from the bank tensors (the model has no way to take banks as
    arguments yet); every layer it calls is the model's own.
    """

    def __init__(self, model: MultiDomainModel, banked: bool) -> None:
        super().__init__()
        self.model = model
        self.banked = banked
        self.multi_hot = bool(model.config.features.multi_hot)

    def forward(self, *inputs: Tensor) -> Tensor:
        sparse, dense, domains = inputs[:3]
        multi_hot = inputs[3] if self.multi_hot else None
        rest = inputs[4:] if self.multi_hot else inputs[3:]
        if not self.banked:
            return torch.sigmoid(self.model(sparse, dense, domains, multi_hot))
        banks = [
            InferenceBank(rest[i], rest[i + 1], rest[i + 2], strategy="gather")
            for i in range(0, len(rest), 3)
        ]
        return torch.sigmoid(self.model(sparse, dense, domains, multi_hot, banks=banks))


def _check_exportable(model: MultiDomainModel) -> None:
    stage = model.stage.name
    if stage in BANK_STAGES or stage in BAKED_STAGES:
        return
    raise OnnxExportError(
        f"a {model.config.method} model in stage {stage!r} cannot be exported: that stage "
        "is a training phase. Switch to a serving stage first, e.g. "
        "model.set_stage('gate') for MoE-MLoRA (or 'backbone' for the backbone alone)."
    )


def _example_inputs(model: MultiDomainModel, batch: int = 6) -> tuple[list[Tensor], list[str]]:
    """Tracing (and check) inputs with their names: random valid ids of every field and domain.

    Sizes that are dynamic in the graph are at least 2 in the example: ``torch.export``
    specialises dimensions of size 0 and 1, so a single-domain bank, a rank-1 layer or a
    ``max_len=1`` field would otherwise be frozen into the graph. The padding (zero bank
    rows and rank columns, -1 ids) changes no score.
    """
    spec, cfg = model.config.features, model.config
    gen = torch.Generator().manual_seed(0)

    def ids(high: int, *shape: int) -> Tensor:
        return torch.randint(0, high, (batch, *shape), generator=gen)

    sparse = [ids(f.vocab_size) for f in spec.sparse]
    inputs = [
        torch.stack(sparse, 1) if sparse else torch.zeros(batch, 0, dtype=torch.long),
        torch.rand(batch, len(spec.dense), generator=gen),
        torch.stack([ids(len(d.domains)) for d in cfg.divisions], 1),
    ]
    names = ["sparse", "dense", "domains"]
    if spec.multi_hot:
        length = max(spec.max_multi_hot_len, 2)
        multi_hot = torch.stack([ids(m.vocab_size + 1, length) - 1 for m in spec.multi_hot], 1)
        inputs.append(multi_hot)
        names.append("multi_hot")
    if has_bank_inputs(model):
        banks = model.folded_banks()
        for bank in banks:
            inputs += _padded(bank)
        names += bank_input_names(len(banks))
    return [t.to(model.device) for t in inputs], names


def _padded(bank: InferenceBank) -> list[Tensor]:
    """``(a, b, c)`` zero-padded to at least 2 domains and rank 2 (same adapter change:
    the extra rank columns of A meet zero rows of B)."""
    d, in_dim, r = bank.a.shape
    out = bank.b.shape[2]
    a = bank.a.new_zeros(max(d, 2), in_dim, max(r, 2))
    b = bank.b.new_zeros(max(d, 2), max(r, 2), out)
    c = bank.c.new_zeros(max(d, 2), out)
    a[:d, :, :r], b[:d, :r], c[:d] = bank.a, bank.b, bank.c
    return [a, b, c]


def _dynamic_shapes(names: list[str]) -> tuple[dict[int, Any], ...]:
    """Batch, domains, multi-hot length and each layer's rank are dynamic.

    The rank is dynamic because MoE-MLoRA's folded rank is the widest domain's experts times
    r: a domain added with ``gate_scope="all"`` sees every expert and widens it.
    """
    dim = torch.export.Dim
    batch, domains = dim("batch", min=1), dim("domains", min=1)
    ranks: dict[str, Any] = {}
    shapes: list[dict[int, Any]] = []
    for name in names:
        if name in ("sparse", "dense", "domains"):
            shapes.append({0: batch})
        elif name == "multi_hot":
            shapes.append({0: batch, 2: dim("multi_hot_len", min=1)})
        else:
            _, layer, part = name.split("_")
            rank_axis = {"a": 2, "b": 1}.get(part)
            shape = {0: domains}
            if rank_axis is not None:
                shape[rank_axis] = ranks.setdefault(layer, dim(f"rank_{layer}", min=1))
            shapes.append(shape)
    return tuple(shapes)


def export_onnx(
    model: MultiDomainModel,
    path: Path | str,
    opset: int | None = None,
    *,
    check: bool = True,
) -> Path:
    """Export ``model``'s eval-mode scorer to the ONNX file ``path`` (see the module docstring).

    The model is put in eval mode for the export and given back in the mode it was in.
    ``opset=None`` takes the exporter's default. With ``check`` the written graph is run once
    with onnxruntime on a small batch and compared with torch; on any failure nothing is left
    at ``path`` (an earlier file there is kept).
    """
    _check_exportable(model)
    path = Path(path)
    banked = has_bank_inputs(model)
    was_training = model.training
    model.eval()
    try:
        inputs, names = _example_inputs(model)
        scorer = _Scorer(model, banked).eval()
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        external = weight_bytes > EXTERNAL_DATA_BYTES
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(path)
        try:
            staged = tmp / path.name
            with torch.no_grad(), _quiet_exporter():
                program = torch.onnx.export(
                    scorer, tuple(inputs), dynamo=True, input_names=names,
                    output_names=[OUTPUT], opset_version=opset, verbose=False,
                    dynamic_shapes=(_dynamic_shapes(names),), external_data=external,
                )  # fmt: skip
            if program is None:
                raise OnnxExportError("torch.onnx.export returned no program")
            program.model.metadata_props.update(_metadata(model))
            program.save(str(staged), external_data=external)
            if check:
                _check_against_torch(model, staged, inputs, names)
            for f in tmp.iterdir():
                os.replace(f, path.parent / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        model.train(was_training)
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and its notes on optional packages (torchvision)
    and on initializers it did not deduplicate, none of which a user can act on."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _metadata(model: MultiDomainModel) -> dict[str, str]:
    cfg = model.config
    return {
        "mdlora.method": cfg.method,
        "mdlora.backbone": cfg.backbone,
        "mdlora.stage": model.stage.name,
        "mdlora.model_signature": model_signature(cfg),
        "mdlora.bank_inputs": str(has_bank_inputs(model)).lower(),
        "mdlora.domains_at_export": str(len(cfg.divisions[0].domains)),
    }


def _check_against_torch(
    model: MultiDomainModel, path: Path, inputs: list[Tensor], names: list[str]
) -> None:
    """Run the written graph and the model's own ``forward`` on the example batch.

    Comparing with ``model.forward`` (not with the export wrapper) also catches the wrapper's
    copy of the forward composition falling out of step with the model's.
    """
    features = dict(zip(names, inputs, strict=True))
    with torch.no_grad():
        logits = model(
            features["sparse"], features["dense"], features["domains"], features.get("multi_hot")
        )
        expected = torch.sigmoid(logits).cpu().numpy()
    session = _session(path, ["CPUExecutionProvider"], threads=1)
    feeds = {n: t.cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    got = session.run([OUTPUT], feeds)[0]
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise OnnxExportError(
            f"the exported graph does not reproduce the {model.config.method} model on the "
            f"check batch (max |diff| {np.abs(got - expected).max():.3g}); please report this"
        )


# ----------------------------------------------------------------------------- runtime
#: an onnxruntime provider: its name, or (name, options) such as a GPU's ``device_id``
Provider = str | tuple[str, dict[str, Any]]


def default_providers(device: torch.device | str | None = None) -> list[Provider]:
    """The providers that score where ``device`` says: the CPU provider for a CPU device,
    the CUDA provider on that GPU (``cuda:1`` -> ``device_id`` 1) for a CUDA one. With no
    device: CUDA (GPU 0) when both onnxruntime and torch see a GPU, else the CPU.

    The ``onnxruntime-gpu`` wheel lists the CUDA provider even on machines without a GPU or
    CUDA libraries, so its list alone does not say that CUDA works; a CUDA device without
    the CUDA provider scores on the CPU, with a warning.
    """
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type != "cuda":
        return ["CPUExecutionProvider"]
    if not cuda:
        if dev is not None:
            log.warning("onnxruntime has no usable CUDA provider here (install onnxruntime-gpu):"
                        " the ONNX graph scores on the CPU, not %s", dev)  # fmt: skip
        return ["CPUExecutionProvider"]
    index = torch.cuda.current_device() if dev is None or dev.index is None else dev.index
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def _session(path: Path, providers: Sequence[Provider], threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; the CPU fallback warning is expected here
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def banks_from_model(model: MultiDomainModel) -> list[NumpyBank]:
    """The model's inference banks as numpy ``(a, b, c)`` per tower layer, for :class:`OnnxScorer`.

    Empty for a stage exported without bank inputs.
    """
    if not has_bank_inputs(model):
        return []
    return [(b.a.cpu().numpy(), b.b.cpu().numpy(), b.c.cpu().numpy()) for b in model.folded_banks()]


def _array(x: ArrayLike, dtype: type[np.generic]) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


class OnnxScorer:
    """An onnxruntime session over a file written by :func:`export_onnx`.

    ``providers``: default :func:`default_providers`; ``threads``: intra-op threads, default
    ``torch.get_num_threads()``.
    """

    def __init__(
        self,
        path: Path | str,
        providers: Sequence[Provider] | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path} (write one with export_onnx)")
        self.session = _session(
            self.path,
            default_providers() if providers is None else providers,
            threads or torch.get_num_threads(),
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.has_multi_hot = "multi_hot" in self.inputs
        self.bank_layers = sum(1 for n in self.input_names if n.startswith("bank_")) // 3
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on."""
        return list(self.session.get_providers())

    def score(
        self,
        sparse: ArrayLike,
        dense: ArrayLike,
        domains: ArrayLike,
        multi_hot: ArrayLike | None = None,
        banks: Sequence[tuple[ArrayLike, ArrayLike, ArrayLike]] | None = None,
    ) -> np.ndarray:
        """Click probabilities ``[B]`` (float32) for one batch; ``banks`` as from
        :func:`banks_from_model` (one ``(a, b, c)`` per tower layer, any number of domains).
        """
        feeds = {
            "sparse": _array(sparse, np.int64),
            "dense": _array(dense, np.float32),
            "domains": _array(domains, np.int64),
        }
        if self.has_multi_hot:
            if multi_hot is None:
                raise OnnxInputError("this model has multi-hot fields: pass multi_hot [B, M, L]")
            feeds["multi_hot"] = _array(multi_hot, np.int64)
        banks = list(banks or [])
        if len(banks) != self.bank_layers:
            raise OnnxInputError(
                f"the graph takes banks for {self.bank_layers} tower layer(s), got {len(banks)}"
                + (" (use banks_from_model(model))" if self.bank_layers else "")
            )
        for i, (a, b, c) in enumerate(banks):
            feeds[f"bank_{i}_a"] = _array(a, np.float32)
            feeds[f"bank_{i}_b"] = _array(b, np.float32)
            feeds[f"bank_{i}_c"] = _array(c, np.float32)
        self._check(feeds)
        return self.session.run([OUTPUT], feeds)[0]

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        """Shape and id checks with messages that say what to fix (onnxruntime's do not, and
        an out-of-range domain id would read past a bank on a GPU)."""
        batch = feeds["domains"].shape[0]
        for name, arr in feeds.items():
            declared = self.inputs[name].shape
            if arr.ndim != len(declared):
                raise OnnxInputError(
                    f"{name}: expected {len(declared)} dims {declared}, got shape {arr.shape}"
                )
            for axis, (want, got) in enumerate(zip(declared, arr.shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise OnnxInputError(f"{name}: axis {axis} must be {want}, got {arr.shape}")
            if name in FEATURE_INPUTS and arr.shape[0] != batch:
                raise OnnxInputError(f"{name} has {arr.shape[0]} rows, domains has {batch}")
        if not self.bank_layers:
            return
        n_dom = feeds["bank_0_a"].shape[0]
        for i in range(self.bank_layers):
            a, b, c = (feeds[f"bank_{i}_{p}"] for p in ("a", "b", "c"))
            if not a.shape[0] == b.shape[0] == c.shape[0] == n_dom:
                raise OnnxInputError(
                    f"bank {i}: a, b, c must all have {n_dom} domains (the first dimension), "
                    f"got {a.shape}, {b.shape}, {c.shape}"
                )
            if a.shape[2] != b.shape[1]:
                raise OnnxInputError(f"bank {i}: rank of a {a.shape} and b {b.shape} differ")
        primary = feeds["domains"][:, 0]
        if batch and (primary.min() < 0 or primary.max() >= n_dom):
            raise OnnxInputError(
                f"domain ids (domains[:, 0]) must be in [0, {n_dom}) for banks of {n_dom} "
                f"domains, got {int(primary.min())}..{int(primary.max())}: are the banks older "
                "than the domain?"
            )
