"""minfer: a small LLM inference engine in NumPy and Numba that you can read and really use."""
import numpy as _np

# numba-cuda 0.30 registers an overload of np.row_stack when numba.cuda is imported; numpy 2.5
# removed that alias (it was np.vstack). minfer pins numpy<2.5, but GPU images may ship a newer one.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack

from .errors import MinferError
from .sampling import SamplingParams
from .llm import LLM, Completion

__all__ = ["LLM", "SamplingParams", "Completion", "MinferError"]
__version__ = "0.1.0"
