"""minfer: a small LLM inference engine in NumPy and Numba that you can read and really use."""
from .errors import MinferError

__all__ = ["LLM", "SamplingParams", "Completion", "MinferError"]
__version__ = "0.1.0"


def __getattr__(name):
    # imported on first use: `python -m minfer --help` starts fast, and a Ctrl-C while numpy,
    # numba and the kernels load is caught by the command line's own handler
    if name in ("LLM", "Completion"):
        from . import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'minfer' has no attribute {name!r}")
