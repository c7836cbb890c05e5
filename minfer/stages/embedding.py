"""Stage 1 — token embedding: token ids -> vectors of the residual stream.

The embedding table E has one row per vocabulary entry; embedding a token is reading its row.
SmolLM2 ties E to the LM head, so the same matrix is read again at the end to score every token.
"""
import numpy as np

from .quant import QuantMatrix, quant_embedding


def embedding(token_ids: np.ndarray, table) -> np.ndarray:
    """token_ids [T] int, table [V, D] -> x [T, D] float32."""
    if isinstance(table, QuantMatrix):                             # e.g. SmolLM2's Q8_0 table
        return quant_embedding(token_ids, table)
    return np.asarray(table[token_ids], dtype=np.float32)          # [T, D]


# --- Numba CPU path: a row copy per token -----------------------------------------------------
from numba import njit  # noqa: E402


def embedding_numba(token_ids, table):
    if isinstance(table, QuantMatrix):   # a few rows: the reference gather is as fast
        return quant_embedding(token_ids, table)
    return _gather_rows(token_ids, table)


@njit(cache=True)
def _gather_rows(token_ids, table):
    T, D = len(token_ids), table.shape[1]
    out = np.empty((T, D), dtype=np.float32)
    for t in range(T):
        out[t, :] = table[token_ids[t]]
    return out
