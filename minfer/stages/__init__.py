"""One module per stage of the forward pass: NumPy reference first, then the fast paths."""
from .. import jitcache, numpy_compat  # noqa: F401  (numpy_compat: before numba.cuda)

jitcache.install()      # before any kernel here is defined: cached kernels see edits to helpers
