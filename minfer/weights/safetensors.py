"""Hugging Face checkpoint folders: config.json + *.safetensors + tokenizer.json.

A .safetensors file is: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}}), then the raw tensor bytes. We read
the header ourselves and memory-map the rest, which also lets us widen bfloat16 (which numpy lacks)
to float32 by a shift.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


MAX_HEADER = 100 << 20     # the format's own limit on the JSON header (100 MB)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> float32 array (f32 stays memory-mapped; f16 and bf16 are widened).
    Anything wrong with the file raises ModelFormatError naming the file and the tensor."""
    try:
        return _read_safetensors(path)
    except (ModelFormatError, UnsupportedModelError):
        raise
    except MemoryError:
        raise ModelFormatError(f"{path}: a tensor asks for more memory than there is; the file "
                               f"is corrupt") from None
    except PermissionError as e:      # not the file's fault: say what is wrong
        raise ModelNotFoundError(f"{path} cannot be read ({e.strerror})") from None
    except Exception as e:  # a parse failure we did not foresee is still a corrupt file
        raise ModelFormatError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > MAX_HEADER:
                raise ValueError(f"a header of {n:,} bytes does not fit the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFormatError(f"{path} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: the header is a JSON {type(header).__name__}, not an object")

    def bad(name, what):
        return ModelFormatError(f"{path}: tensor {name!r} {what}")

    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(0, np.uint8)
    base, data = 8 + n, size - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise bad(name, "lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise bad(name, f"has dtype {dtype!r}")
        if dtype not in _DTYPES:
            raise UnsupportedModelError(f"{path.name}: tensor {name!r} has dtype {dtype} "
                                        f"(minfer reads F32, F16 and BF16)")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise bad(name, f"has shape {shape!r}; a list of sizes >= 0 is needed")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise bad(name, f"has data_offsets {offsets!r}, which do not lie in the file's "
                            f"{data:,} data bytes (the file may be truncated)")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if count * itemsize != end - begin:
            raise bad(name, f"of shape {shape} and dtype {dtype} needs {count * itemsize:,} bytes "
                            f"but its data_offsets span {end - begin:,}")
        if begin % itemsize:
            raise bad(name, f"starts at data byte {begin:,}, not a multiple of {itemsize}")
        spans.append((begin, end, name))
        arr = mm[base + begin:base + end].view(_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)   # bf16 is the top half of an f32
        elif dtype == "F16":
            arr = arr.astype(np.float32)
        out[name] = arr
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ModelFormatError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return out


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (config.json as a dict, all tensors by HF name)."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{folder} has no config.json; a Hugging Face model folder needs "
                                 f"config.json, *.safetensors and tokenizer.json")
    try:
        config = json.loads(cfg_path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{cfg_path} is not valid JSON ({e})") from None
    except OSError as e:
        raise ModelFormatError(f"{cfg_path} could not be read ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors files "
                                 f"(PyTorch .bin checkpoints are not supported)")
    index = folder / "model.safetensors.index.json"     # a sharded checkpoint's list of files
    if index.exists():
        try:
            shards = set(json.loads(index.read_bytes()).get("weight_map", {}).values())
        except (ValueError, RecursionError, AttributeError, TypeError, OSError):
            shards = set()                              # (the tensors' own checks still hold)
        missing = sorted(str(x) for x in shards if not (folder / str(x)).exists())
        if missing:
            raise ModelNotFoundError(f"{folder} lacks {', '.join(missing)} (listed in "
                                     f"model.safetensors.index.json): a download not finished?")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for name, arr in read_safetensors(f).items():
            if name in tensors:
                raise ModelFormatError(f"tensor {name!r} is in two files of {folder}")
            tensors[name] = arr
    return config, tensors
