"""The GGUF container, parsed straight from the file: metadata and the tensor index.

Layout (llama.cpp's ``docs/gguf.md``, versions 2 and 3, little-endian): ``GGUF``, version u32,
tensor count u64, metadata count u64; each metadata entry is a string key, a u32 value type and the
value; each tensor a string name, a u32 rank, its u64 dimensions (innermost first), a u32 ggml type
and a u64 offset into the data section, which starts at the next multiple of ``general.alignment``
(32 unless set). A string is a u64 byte count and UTF-8 bytes; an array a u32 element type, a u64
count and the elements.

The ``gguf`` package's ``GGUFReader`` reads the same but builds NumPy views per string: opening the
demo SmolLM2 (98k tokenizer strings) took it 2.6 s and this reader 0.09 s (``time.perf_counter``
around each, on this project's 2-core machine); every ``asft`` command on a GGUF model opens it.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any

import numpy as np

from asft_jax.errors import AsftError

# ggml tensor types by id (ggml.h); the gaps are ids llama.cpp has retired
GGML_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
}

# metadata value types: id -> struct format of a scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index; ``offset`` is from the start of the file."""

    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (contiguous) dimension first
    type_name: str  # a GGML_TYPES name, or "type <id>" for one this table does not know
    offset: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> int:
        """Position of the next ``n`` bytes, moving past them."""
        if self.pos + n > len(self.buf):
            raise ValueError(f"it ends at byte {len(self.buf)}, inside its header: truncated?")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("Q")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos - 4}")
        etype, count = self.unpack("IQ")
        if etype in _SCALARS:  # one read for the whole array
            dtype = np.dtype("<" + _SCALARS[etype])
            return np.frombuffer(self.buf, dtype, count, self.take(count * dtype.itemsize)).tolist()
        return [self.value(etype) for _ in range(count)]


def read_gguf(path: str) -> tuple[dict[str, Any], list[TensorInfo], mmap.mmap]:
    """(metadata, tensor index, the file memory-mapped read-only) of a GGUF file.

    Metadata values are Python scalars, strings or lists. Raises ``AsftError`` naming the file when
    it is not a GGUF file this reader understands or its header is cut short."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise AsftError(f"{path}: not a readable GGUF file (empty)") from None
    try:
        cur = _Cursor(buf)
        magic, version = cur.unpack("4sI")
        if magic != b"GGUF":
            raise ValueError(f"starts with {magic!r}, not b'GGUF'")
        if version not in (2, 3):
            raise ValueError(f"version {version} (this reader knows versions 2 and 3)")
        n_tensors, n_fields = cur.unpack("QQ")
        fields = {}
        for _ in range(n_fields):
            key = cur.string()
            (vtype,) = cur.unpack("I")
            fields[key] = cur.value(vtype)
        index = []
        for _ in range(n_tensors):
            name = cur.string()
            (rank,) = cur.unpack("I")
            dims = cur.unpack(f"{rank}Q")
            ttype, offset = cur.unpack("IQ")
            index.append((name, dims, GGML_TYPES.get(ttype, f"type {ttype}"), offset))
    except (ValueError, OverflowError, struct.error) as e:  # damaged counts or sizes
        buf.close()
        raise AsftError(f"{path}: not a readable GGUF file ({e})") from None
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = [TensorInfo(name, tuple(dims), type_name, start + off) for name, dims, type_name, off in index]
    return fields, tensors, buf
