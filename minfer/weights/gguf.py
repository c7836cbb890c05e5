"""A small GGUF reader.

GGUF (llama.cpp's file format) is one file: a header, key/value metadata, a table of tensor
descriptions, then the tensor data, aligned. We parse the header ourselves (it is short, and a
pure-Python parse is ~50x faster to open than a general-purpose reader) and memory-map the data, so
a tensor costs nothing until it is touched.

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv   x  key (string) | value type u32 | value
    n_tensors x name (string) | n_dims u32 | dims u64[n_dims] | ggml type u32 | offset u64
    padding to `general.alignment` (32) | tensor data ...

Strings are u64 length + UTF-8 bytes. Dims are in ggml order: dims[0] varies fastest, so a matmul
weight with dims [in, out] is a row-major [out, in] matrix.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError
from ..stages import quant

# ggml tensor types we read: name, bytes per block, elements per block
GGML_TYPES = {
    0: ("F32", 4, 1),
    1: ("F16", 2, 1),
    2: ("Q4_0", 18, 32),
    3: ("Q4_1", 20, 32),
    8: ("Q8_0", 34, 32),
    30: ("BF16", 2, 1),
}

# metadata value types: struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    type: str                 # "F32", "Q4_1", ...
    shape: tuple[int, ...]    # numpy order (reversed ggml dims): [out, in] for a matmul weight
    data: np.ndarray          # raw bytes (uint8 memmap view) for block types, typed array otherwise

    def to_float32(self) -> np.ndarray:
        """Dequantize (or widen) to a float32 array of `shape`."""
        if self.type == "F32":
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.type == "F16":
            return self.data.astype(np.float32).reshape(self.shape)
        if self.type == "BF16":
            return (self.data.astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        return quant.dequantize(self.data, self.type, self.shape)


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS and itype != 7:
                # numeric arrays: one numpy read instead of `count` struct calls
                dt = np.dtype(_SCALARS[itype])
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += dt.itemsize * count
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        raise ModelFormatError(f"unknown GGUF metadata type {vtype}")


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, GGUFTensor]]:
    """Return (metadata, tensors by name). Tensor data is memory-mapped, not read."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise ModelFormatError(f"{path} is too short to be a GGUF file ({size} bytes)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    try:
        if bytes(cur.buf[:4]) != b"GGUF":
            raise ModelFormatError(f"{path} is not a GGUF file (bad magic bytes)")
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        meta: dict = {"GGUF.version": version}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    except (struct.error, ValueError, IndexError) as e:
        raise ModelFormatError(f"{path} is truncated or corrupt (header unreadable: {e})") from None

    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, ttype, offset in infos:
        if ttype not in GGML_TYPES:
            raise UnsupportedModelError(
                f"tensor {name!r} has ggml type {ttype}, which minfer cannot read "
                f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
        tname, block_bytes, block_elems = GGML_TYPES[ttype]
        shape = tuple(int(d) for d in reversed(dims))
        n = int(np.prod(shape))
        nbytes = n // block_elems * block_bytes
        start = data_start + offset
        if start + nbytes > size:
            raise ModelFormatError(
                f"{path} is truncated: tensor {name!r} ends at byte {start + nbytes:,} but the file "
                f"has {size:,}; delete it and download it again")
        raw = mm[start:start + nbytes]
        if tname == "F32":
            raw = raw.view(np.float32).reshape(shape)
        elif tname in ("F16",):
            raw = raw.view(np.float16).reshape(shape)
        elif tname == "BF16":
            raw = raw.view(np.uint16).reshape(shape)
        tensors[name] = GGUFTensor(name, tname, shape, raw)
    return meta, tensors
