"""Say which tensor of a safetensors file is malformed, and what was expected.

The safetensors parser refuses a file whose header disagrees with its data (a shape, dtype or
byte range that does not fit) with a message that names no tensor ("invalid shape, data type,
or offset for tensor"). :func:`header_problem` reads the header itself (JSON after an 8-byte
little-endian length) and names the first tensor at fault; it only reads, never loads tensors.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: bytes per element of the dtypes safetensors writes (sub-byte float formats left out)
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # the parser's own cap


def _ints(value: Any, n: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (n is None or len(value) == n)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def header_problem(data: bytes) -> str | None:
    """What is wrong with the header of safetensors ``data``, naming the tensor (None when
    nothing is found: the caller keeps the parser's own message)."""
    if len(data) < 8:
        return f"the file is {len(data)} bytes, shorter than the 8-byte header length"
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        return f"the header length says {n} bytes, the file holds {len(data) - 8} after it"
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as exc:
        return f"the header is not valid JSON ({str(exc)[:200]})"
    if not isinstance(header, dict):
        return "the header is not a JSON object of tensor name -> {dtype, shape, data_offsets}"
    size = len(data) - 8 - n
    spans = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict):
            return f"tensor {name!r}: expected {{dtype, shape, data_offsets}}, got {spec!r:.100}"
        dtype: Any = spec.get("dtype")
        shape: Any = spec.get("shape")
        offsets: Any = spec.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            return f"tensor {name!r}: unknown dtype {dtype!r:.40}"
        if not _ints(shape):
            return f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r:.100}"
        if not _ints(offsets, 2) or offsets[1] < offsets[0]:
            return f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r:.100}"
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        begin, end = offsets
        if end - begin != want:
            return (
                f"tensor {name!r}: shape {shape} of {dtype} takes {want} bytes, its "
                f"data_offsets [{begin}, {end}] hold {end - begin}"
            )
        if end > size:
            return (
                f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the "
                f"{size}-byte data section"
            )
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            return (
                f"tensor {name!r} starts at byte {begin} of the data, expected {at} (tensors "
                "must follow each other with no gap or overlap)"
            )
        at = end
    if at != size:
        return f"the data section has {size} bytes, its tensors cover {at}"
    return None
