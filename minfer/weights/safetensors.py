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


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> float32 array (f32 stays memory-mapped; f16 and bf16 are widened)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not a readable safetensors file ({e})") from None
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise UnsupportedModelError(f"{path.name}: tensor {name!r} has dtype {info['dtype']} "
                                        f"(minfer reads F32, F16 and BF16)")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ModelFormatError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
        arr = mm[base + begin:base + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)   # bf16 is the top half of an f32
        elif info["dtype"] == "F16":
            arr = arr.astype(np.float32)
        out[name] = arr
    return out


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (config.json as a dict, all tensors by HF name)."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{folder} has no config.json; a Hugging Face model folder needs "
                                 f"config.json, *.safetensors and tokenizer.json")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelFormatError(f"{cfg_path} is not valid JSON ({e})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors files "
                                 f"(PyTorch .bin checkpoints are not supported)")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return config, tensors
