"""numba-cuda 0.30 registers an overload of np.row_stack when numba.cuda is first imported; numpy
2.5 removed that alias (it was np.vstack). minfer pins numpy<2.5, but GPU images may ship a newer
one: every module that may be first to import numba.cuda imports this one before."""
import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
