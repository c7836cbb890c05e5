"""numba.cuda for the stage modules, imported when a GPU kernel is first used.

Each stage module ends with its numba.cuda kernels. Importing numba.cuda takes a while, and only
the cuda backend and the GPU lessons need it — not `import minfer`, not the numpy and numba
backends. So the stage modules write

    from .lazy_cuda import cuda      # numba.cuda, imported when a kernel is first used

and define their kernels with `@cuda.jit` as usual. Until a kernel is used, `cuda.jit` only
notes the function and its options. The first time a kernel of a module is used (launched,
called, or asked for an attribute such as `.py_func`), numba.cuda is imported, all of that
module's kernels are made with numba.cuda.jit, and the module's own names — `cuda` and each
kernel's — are bound to the real objects: the kernels then see numba.cuda and each other exactly
as if the module had imported numba.cuda at its top. Any other attribute (`cuda.to_device`,
`cuda.device_array`, ...) is numba.cuda's own, imported then.

A kernel of a stage module called inside a kernel of another module (a device function) must be
the real one: take it from `compiled(module)` (gpu/linear.py does so for silu and RoPE).
"""
from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
_noted: dict[str, list] = {}     # module name -> its kernels given to cuda.jit, not made yet


def _numba_cuda():
    from .. import numpy_compat  # noqa: F401  (before numba.cuda)
    from numba import cuda
    return cuda


class LazyCUDAKernel:
    """A function given to cuda.jit, not made yet: its first use makes its module's kernels."""

    def __init__(self, fn, options: dict):
        self._fn, self._options, self._made = fn, options, None
        self.__name__, self.__module__, self.__doc__ = fn.__name__, fn.__module__, fn.__doc__
        _noted.setdefault(fn.__module__, []).append(self)

    def made(self):
        """The real kernel (numba.cuda's dispatcher, or the simulator's)."""
        if self._made is None:
            compiled(sys.modules[self.__module__])
        return self._made

    def __getitem__(self, launch):               # kernel[grid, block, stream](...)
        return self.made()[launch]

    def __call__(self, *args, **kwargs):
        return self.made()(*args, **kwargs)

    def __getattr__(self, name):                 # .py_func, .inspect_types, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.made(), name)


class _LazyCuda:
    """Stands for numba.cuda in a stage module until the module's kernels are made."""

    def jit(self, fn=None, **options):
        if fn is None:                           # @cuda.jit(device=True, ...)
            return lambda f: LazyCUDAKernel(f, options)
        return LazyCUDAKernel(fn, options)       # @cuda.jit

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_numba_cuda(), name)


cuda = _LazyCuda()


def compiled(module):
    """`module` (a stage module) with its GPU kernels made; numba.cuda is imported the first time."""
    with _lock:
        kernels = _noted.pop(module.__name__, [])
        if not kernels:
            return module
        real = _numba_cuda()
        g = vars(module)
        if g.get("cuda") is cuda:
            g["cuda"] = real                     # the kernels' bodies read cuda.threadIdx, ...
        for k in kernels:
            k._made = real.jit(**k._options)(k._fn) if k._options else real.jit(k._fn)
            if g.get(k.__name__) is k:
                g[k.__name__] = k._made          # the kernels call each other by these names
    return module
