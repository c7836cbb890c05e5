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

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
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

# the names of the types minfer does not read, for its message (ggml.h's enum)
OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
               14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
               20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
               27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}

# metadata value types: struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


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


GGML_MAX_DIMS = 4        # ggml tensors have at most 4 dimensions
MAX_NESTING = 4          # arrays of arrays: deeper than any real file, shallow enough for the stack


class _Cursor:
    """Reads the header. Every length and count is checked against the bytes that remain before
    anything is allocated, so a corrupt count fails at once instead of asking for terabytes."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos, self.end = buf, 0, len(buf)
        self.field = "header"        # what is being read, for the error message

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.end - self.pos:
            raise ModelFormatError(
                f"{what} needs {n:,} bytes at byte {self.pos:,} but only {self.end - self.pos:,} remain")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size, self.field)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        self.need(n, f"a string of {n:,} bytes in {self.field}")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, count: int) -> list[str]:
        """`count` strings: the vocabulary and the merges, ~100,000 of them, so a tight loop."""
        buf, pos, end, unpack, out = self.buf, self.pos, self.end, _U64.unpack_from, []
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                break
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        if len(out) < count:
            self.need(8 if pos + 8 > end else end - pos + 1, f"string #{len(out)} of {self.field}")
        return out

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise ModelFormatError(f"{self.field}: arrays nested deeper than {MAX_NESTING}")
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:
                dt = np.dtype(_SCALARS[itype])
                self.need(dt.itemsize * count, f"an array of {count:,} values in {self.field}")
                if itype == 7:
                    arr = np.frombuffer(self.buf, dtype=np.uint8, count=count, offset=self.pos) != 0
                else:
                    # numeric arrays: one numpy read instead of `count` struct calls
                    arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += dt.itemsize * count
                return arr.tolist()
            if itype == _STRING:
                self.need(8 * count, f"an array of {count:,} strings in {self.field}")
                return self.strings(count)
            if itype == _ARRAY:
                self.need(12 * count, f"an array of {count:,} arrays in {self.field}")
            else:
                raise ModelFormatError(f"{self.field}: unknown GGUF array element type {itype}")
            return [self.value(itype, depth + 1) for _ in range(count)]
        raise ModelFormatError(f"{self.field}: unknown GGUF metadata type {vtype}")


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, GGUFTensor]]:
    """Return (metadata, tensors by name). Tensor data is memory-mapped, not read.
    Anything wrong with the file raises ModelFormatError (or UnsupportedModelError for a tensor
    type minfer does not read) naming the file and the field or tensor."""
    path = Path(path)
    try:
        return _read_gguf(path)
    except (ModelFormatError, UnsupportedModelError) as e:
        msg = str(e)
        raise type(e)(msg if str(path) in msg else f"{path}: {msg}") from None
    except MemoryError:
        raise ModelFormatError(f"{path}: the header asks for more memory than there is; the file "
                               f"is corrupt") from None
    except PermissionError as e:      # not the file's fault: say what is wrong
        raise ModelNotFoundError(f"{path} cannot be read ({e.strerror})") from None
    except Exception as e:  # a parse failure we did not foresee is still a corrupt file
        raise ModelFormatError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def _read_gguf(path: Path) -> tuple[dict, dict[str, GGUFTensor]]:
    size = path.stat().st_size
    if size < 24:
        raise ModelFormatError(f"{path} is too short to be a GGUF file ({size} bytes)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    if bytes(cur.buf[:4]) != b"GGUF":
        raise ModelFormatError(f"{path} is not a GGUF file (bad magic bytes)")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    # a key/value takes at least 12 bytes, a tensor description at least 24
    cur.need(12 * n_kv, f"{n_kv:,} metadata entries")
    cur.need(24 * n_tensors, f"{n_tensors:,} tensor descriptions")
    meta: dict = {"GGUF.version": version}
    for i in range(n_kv):
        cur.field = f"metadata key #{i}"
        key = cur.string()
        cur.field = f"metadata {key!r}"
        if key in meta:
            raise ModelFormatError(f"metadata key {key!r} appears twice")
        meta[key] = cur.value(cur.take("<I"))
    infos = []
    for i in range(n_tensors):
        cur.field = f"tensor description #{i}"
        name = cur.string()
        cur.field = f"tensor {name!r}"
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise ModelFormatError(f"tensor {name!r} has {n_dims} dimensions (1 to {GGML_MAX_DIMS} are possible)")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))

    align = meta.get("general.alignment", 32)
    if type(align) is not int or align < 1 or align > 1 << 20 or align & (align - 1):
        raise ModelFormatError(f"general.alignment is {align!r}; it must be a power of two")
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, GGUFTensor] = {}
    spans = []
    for name, dims, ttype, offset in infos:
        if name in tensors:
            raise ModelFormatError(f"tensor {name!r} appears twice")
        if ttype not in GGML_TYPES:
            raise UnsupportedModelError(
                f"tensor {name!r} has ggml type {OTHER_TYPES.get(ttype, ttype)}, which minfer "
                f"cannot read "
                f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
        tname, block_bytes, block_elems = GGML_TYPES[ttype]
        if min(dims) < 1:
            raise ModelFormatError(f"tensor {name!r} has an empty dimension: {dims}")
        if dims[0] % block_elems:
            raise ModelFormatError(f"tensor {name!r} ({tname}) has rows of {dims[0]} values, not a "
                                   f"multiple of its {block_elems}-value blocks")
        n = 1
        for d in dims:   # Python ints: a product that would overflow int64 is simply too large
            n *= d
        nbytes = n // block_elems * block_bytes
        if offset % align:
            raise ModelFormatError(f"tensor {name!r} starts at offset {offset:,}, not a multiple "
                                   f"of the alignment {align}")
        start = data_start + offset
        if start + nbytes > size:
            raise ModelFormatError(
                f"{path} is truncated or corrupt: tensor {name!r} ends at byte {start + nbytes:,} "
                f"but the file has {size:,}; delete it and download it again")
        spans.append((start, start + nbytes, name))
        shape = tuple(int(d) for d in reversed(dims))
        raw = mm[start:start + nbytes]
        if tname == "F32":
            raw = raw.view(np.float32).reshape(shape)
        elif tname in ("F16",):
            raw = raw.view(np.float16).reshape(shape)
        elif tname == "BF16":
            raw = raw.view(np.uint16).reshape(shape)
        tensors[name] = GGUFTensor(name, tname, shape, raw)
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ModelFormatError(f"tensors {a!r} and {b!r} overlap in the file")
    return meta, tensors
