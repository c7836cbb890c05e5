"""numba's on-disk kernel cache, made to notice an edit in any of minfer's kernel files.

numba keys a cached kernel on the contents of its own file only, yet the machine code of a kernel
includes the @njit helpers it calls from other files: fused.py's and region.py's layer loops call
every stage, attention.py calls fastexp.py. After an edit to such a helper, the cache would go on
serving the old code, silently. So every kernel in minfer.stages, .fused and .region is stamped
with the contents of all those files together: any edit there recompiles them all on the next
run (~20-40 s, once).
stages/__init__.py installs this before any kernel is defined.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os

from numba.core import caching

_HERE = os.path.dirname(os.path.abspath(__file__))
_FILES = (os.path.join(_HERE, "fused.py"), os.path.join(_HERE, "region.py"))
_STAGES = os.path.join(_HERE, "stages")


@functools.lru_cache(maxsize=None)
def _digest(path: str, mtime: float, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sources_stamp() -> str:
    """One hash of the current contents of every watched kernel file."""
    files = list(_FILES) + sorted(glob.glob(os.path.join(_STAGES, "*.py")))
    h = hashlib.sha256()
    for p in files:
        st = os.stat(p)
        h.update(_digest(p, st.st_mtime, st.st_size).encode())
    return h.hexdigest()


def _watching(base):
    """numba's locator `base`, for minfer's kernel files only, with the wider stamp."""
    class Locator(base):
        def get_source_stamp(self):
            return super().get_source_stamp(), sources_stamp()

        @classmethod
        def from_function(cls, py_func, py_file):
            p = os.path.abspath(py_file)
            if p not in _FILES and os.path.dirname(p) != _STAGES:
                return None                                  # not ours: numba's own locators
            return super().from_function(py_func, py_file)
    Locator.__name__ = Locator.__qualname__ = "Minfer" + base.__name__
    return Locator


def _numba(*names):
    """The first of these names numba's caching module has (they lost their leading _ in 0.61)."""
    return next((getattr(caching, n) for n in names if hasattr(caching, n)), None)


def install() -> None:
    impl = _numba("CacheImpl", "_CacheImpl")
    user, in_tree = (_numba("UserProvidedCacheLocator", "_UserProvidedCacheLocator"),
                     _numba("InTreeCacheLocator", "_InTreeCacheLocator"))
    if impl is None or user is None or in_tree is None:
        return                                   # a numba we do not know: its own stamps
    classes = impl._locator_classes
    if not any(c.__name__.startswith("Minfer") for c in classes):
        # numba's own order: NUMBA_CACHE_DIR first, else the __pycache__ beside the file
        classes[:0] = [_watching(user), _watching(in_tree)]
