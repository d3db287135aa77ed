"""A malformed safetensors header is refused naming the tensor at fault and what it expected."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import save

from mdlora.formats.files import (
    ArtifactError,
    load_safetensors_bytes,
)
from mdlora.formats.safetensors_header import header_problem

GOOD = save({"a": torch.zeros(2, 3), "b": torch.ones(4)})  # a: bytes 0-24, b: 24-40


def forged(data: bytes = b"", **entries: dict[str, Any]) -> bytes:
    n = int.from_bytes(GOOD[:8], "little")
    header = json.loads(GOOD[8 : 8 + n])
    for name, spec in entries.items():
        header[name].update(spec)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + (data or GOOD[8 + n :])


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (forged(a={"shape": [3, 3]}), "tensor 'a': shape [3, 3] of F32 takes 36 bytes, its "
         "data_offsets [0, 24] hold 24"),
        (forged(a={"dtype": "F64"}), "tensor 'a': shape [2, 3] of F64 takes 48 bytes"),
        (forged(b={"data_offsets": [32, 48]}), "tensor 'b': data_offsets [32, 48] run past"),
        (forged(b"\0" * 44, b={"data_offsets": [28, 44]}), "tensor 'b' starts at byte 28 of "
         "the data, expected 24"),
        (forged(b"\0" * 48), "the data section has 48 bytes, its tensors cover 40"),
        (b"\xff" * 16, "the header length says"),
    ],
)  # fmt: skip
def test_the_tensor_at_fault_is_named(data: bytes, needle: str) -> None:
    with pytest.raises(ArtifactError) as err:
        load_safetensors_bytes(data, "adapter_model.safetensors")
    assert needle in str(err.value)
    assert "invalid shape, data type, or offset" not in str(err.value)


def test_a_good_file_has_no_problem() -> None:
    assert header_problem(GOOD) is None
    assert set(load_safetensors_bytes(GOOD, "x")) == {"a", "b"}
