"""Stage — linear layers (no bias in Llama): y = x W^T.

Weights are stored as in the file: W is [out, in], row-major, so each output is a dot product
with one contiguous row. The reference simply calls BLAS.
"""
import numpy as np


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [T, in], w [out, in] -> [T, out]."""
    return x @ w.T                                                  # [T, out]
