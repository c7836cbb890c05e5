"""Weights on the device, in their file's own format: DeviceMatrix, the GPU twin of quant.QuantMatrix.

The GPU kernels that read weights (gpu/linear.py's matmuls, embedding.py's lookup: the tied LM
head reads the very same arrays) take a matrix as (fmt, w, qs, d, m). The quants are uploaded as
32-bit words (the same bytes, read four at a time); the scales d (and m) as float32 [O, K/32]:
    Q8_0  qs uint32 [O, K/4]   one signed byte per weight
    Q4_*  qs uint32 [O, K/8]   the file's bytes of the row (Q4 covers Q4_0 and Q4_1)
    F32   w float32 [O, K]
"""
from __future__ import annotations

import numpy as np

from .lazy_cuda import cuda      # numba.cuda, imported when first used
from .quant import QuantMatrix

F32, Q8_0, Q4 = 0, 1, 2      # weight formats as the kernels know them (Q4 covers Q4_0 and Q4_1)


class DeviceMatrix:
    """A [O, K] weight on the device, in its own format. `w`, `qs`, `d`, `m` are always device
    arrays (the unused ones are 1x1 dummies), so every format goes through the same kernel."""

    def __init__(self, fmt: int, shape, w, qs, d, m):
        self.fmt, self.shape, self.w, self.qs, self.d, self.m = fmt, tuple(shape), w, qs, d, m

    @classmethod
    def upload(cls, w, stream=0) -> "DeviceMatrix":
        """w: a float32 ndarray [O, K] or a QuantMatrix (or a list of them: their rows stacked)."""
        ws = w if isinstance(w, (list, tuple)) else [w]
        fmts = {x.fmt if isinstance(x, QuantMatrix) else "F32" for x in ws}
        if len(fmts) > 1:        # e.g. Q and V in different block formats: stack them as float32
            ws = [x.dequantize() if isinstance(x, QuantMatrix) else x for x in ws]
            fmts = {"F32"}
        fmt = fmts.pop()
        O, K = sum(x.shape[0] for x in ws), ws[0].shape[1]
        one_f, one_u = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.uint32)
        dev = lambda a: cuda.to_device(np.ascontiguousarray(a), stream=stream)  # noqa: E731
        if fmt == "F32":
            w32 = np.concatenate([np.asarray(x, dtype=np.float32) for x in ws])
            return cls(F32, (O, K), dev(w32), dev(one_u), dev(one_f), dev(one_f))
        qs = np.concatenate([x.qs for x in ws]).view(np.uint32)           # the file's bytes as words
        d = np.concatenate([x.d for x in ws])
        if fmt == "Q8_0":
            return cls(Q8_0, (O, K), dev(one_f), dev(qs), dev(d), dev(one_f))
        m = np.concatenate([np.broadcast_to(x.m, x.d.shape) for x in ws]).astype(np.float32)
        return cls(Q4, (O, K), dev(one_f), dev(qs), dev(d), dev(m))

    @property
    def arrays(self):
        return self.fmt, self.w, self.qs, self.d, self.m
