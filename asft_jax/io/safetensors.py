"""Reading and writing the safetensors format with NumPy, memory-mapped and streamed.

Format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the raw little-endian tensor bytes
(offsets relative to the end of the header). Written by hand rather than through the
``safetensors`` package so that bfloat16 works without torch and a truncated file is caught
with the name of the tensor that runs past its end.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from asft_jax.errors import AsftError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """A validated, memory-mapped safetensors file; ``get`` returns a zero-copy view."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise AsftError(f"{path}: file not found")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AsftError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise AsftError(f"{path}: truncated or not safetensors (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise AsftError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = header
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise AsftError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            expected = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
            if end - begin != expected:
                raise AsftError(f"{path}: tensor {name!r} has {end - begin} bytes, its shape needs {expected}")
            if self._start + end > size:
                raise AsftError(
                    f"{path}: truncated file: tensor {name!r} ends at byte {self._start + end}, "
                    f"the file has {size} bytes"
                )
        self._mm = np.memmap(path, np.uint8, "r") if size > self._start else np.zeros(0, np.uint8)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        info = self._entries[name]
        begin, end = info["data_offsets"]
        raw = self._mm[self._start + begin : self._start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape and dtype, and a function that produces its values."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _write_file(path: str, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for s in specs:
            arr = np.ascontiguousarray(s.produce(), dtype=s.dtype)
            if arr.shape != s.shape:
                raise ValueError(f"{s.name}: produced shape {arr.shape}, declared {s.shape}")
            f.write(arr.tobytes())
    os.replace(tmp, path)


def write_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes ``tensors`` to the one safetensors file ``path``, created like any other file (the
    ``safetensors`` package's writer makes it readable by its owner only)."""
    specs = [TensorSpec(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    _write_file(path, specs, {"format": "pt"})


def write_sharded(
    directory: str,
    specs: Iterable[TensorSpec],
    max_shard_bytes: int = 5 * 10**9,
) -> list[str]:
    """Writes ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when the total exceeds ``max_shard_bytes``.

    Tensors are produced and written one at a time, so peak host memory is one tensor.
    Returns the file names written.
    """
    metadata = {"format": "pt"}  # what transformers expects of a PyTorch-layout checkpoint
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    if len(shards) == 1:
        _write_file(os.path.join(directory, "model.safetensors"), shards[0], metadata)
        return ["model.safetensors"]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_file(os.path.join(directory, name), shard, metadata)
        weight_map.update({s.name: name for s in shard})
    index = {"metadata": {"total_size": sum(s.nbytes for sh in shards for s in sh)}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, "model.safetensors.index.json"]
