"""minfer: a small LLM inference engine in NumPy and Numba that you can read and really use."""
from .errors import MinferError
from .sampling import SamplingParams
from .llm import LLM, Completion

__all__ = ["LLM", "SamplingParams", "Completion", "MinferError"]
__version__ = "0.1.0"
