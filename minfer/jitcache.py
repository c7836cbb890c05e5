"""numba's on-disk kernel cache, made to notice an edit in any of minfer's kernel files.

numba keys a cached kernel on the contents of its own file only, yet the machine code of a kernel
includes the @njit helpers it calls from other files: cpu/region.py's layer loop calls every
stage, attention.py calls fastexp.py. After an edit to such a helper, the cache would go on serving
the old code, silently. So every kernel in minfer.stages and minfer.cpu is stamped
with the contents of all those files together: any edit there recompiles them all on the next
run (once; docs/benchmarks.md has how long).
stages/__init__.py installs this before any kernel is defined.

`compiling(...)` shows what numba compiles while it compiles: a notice when the first kernel
starts (whenever that is: a first run, an edit, a new weight format), the kernel at work, a counter
(and a bar, with the total and an estimate from the last time the same configuration compiled).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import sys
import time

from numba.core import caching

_HERE = os.path.dirname(os.path.abspath(__file__))
_DIRS = (os.path.join(_HERE, "stages"), os.path.join(_HERE, "cpu"))


@functools.lru_cache(maxsize=None)
def _digest(path: str, mtime: float, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sources_stamp() -> str:
    """One hash of the current contents of every watched kernel file."""
    files = [p for d in _DIRS for p in sorted(glob.glob(os.path.join(d, "*.py")))]
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
            if os.path.dirname(p) not in _DIRS:
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


# ---------------------------------------------------------------------------------------------
# Progress while numba compiles
# ---------------------------------------------------------------------------------------------

FIRST_ESTIMATE = "about a minute on a 2-core CPU, less on more cores"


def _times_file() -> str:
    from .weights.fetch import home
    return os.path.join(str(home()), "compile-times.json")


def _kernel_name(dispatcher) -> str:
    f = getattr(dispatcher, "py_func", None)
    if f is None:
        return str(dispatcher)
    module = f.__module__.removeprefix("minfer.").replace(".", "/")
    return f"{module}.py:{f.__qualname__}"


def _ours(dispatcher) -> bool:
    """Not a student's exercise file (classroom.load_student_module's modules): numba caches no
    kernel of theirs, so they compile on every run — no news worth a notice."""
    f = getattr(dispatcher, "py_func", None)
    return f is None or not (f.__module__ or "").startswith("minfer_student_")


class _Progress:
    """A numba "numba:compile" listener: counts what numba compiles and reports it on `stream`,
    with a bar and the time left when the same configuration has compiled before."""

    def __init__(self, what: str, key: str | None, stream):
        self.what, self.key, self.stream = what, key, stream
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.stack, self.done, self.t0, self.current = [], [], None, None
        self.foreign = []                                  # per compile under way: not minfer's?
        self.expected = self._load().get(key) if key else None   # {"names": [...], "seconds": s}

    def _load(self) -> dict:
        try:
            with open(_times_file()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _write(self, text: str, end: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if end else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _line(self) -> str:
        k, el = len(self.done), time.perf_counter() - self.t0
        if self.expected:
            n = max(len(self.expected["names"]), k + 1)
            f = min(0.99, el / max(self.expected["seconds"], 1e-9))  # by time: the last one is long
            bar = "#" * round(20 * f) + "-" * (20 - round(20 * f))
            count = f"[{bar}] {k}/{n}"
            left = f", ~{max(0.0, self.expected['seconds'] - el):.0f} s left"
        else:
            count, left = f"{k} compiled so far,", ""
        return f"  {count} now {self.current} ({el:.0f} s{left})"

    # numba's Listener interface. Every function numba compiles counts, a kernel's callees
    # included (a layer loop compiles the stage kernels it calls inside its own compile).
    def on_start(self, event):
        ours = _ours(event.data["dispatcher"]) or bool(self.stack)
        self.foreign.append(not ours)
        if not ours:
            return                                 # a student's kernel (_ours)
        self.stack.append(_kernel_name(event.data["dispatcher"]))
        self.current = self.stack[-1]
        if self.t0 is None:
            self.t0 = self.shown = time.perf_counter()
            est = (f"about {self.expected['seconds']:.0f} s, as last time" if self.expected
                   else FIRST_ESTIMATE)
            self.stream.write(f"minfer: compiling {self.what} (once: numba caches them on disk; "
                              f"{est})\n")
        self._show()

    def on_end(self, event):
        if self.foreign.pop():
            return
        self.done.append(self.stack.pop())
        self.current = self.stack[-1] if self.stack else self.done[-1]
        self._show()

    def _show(self) -> None:
        # on a terminal, one line redrawn at each event; in a log, a line every 10 s at most
        if self.tty or time.perf_counter() - self.shown >= 10:
            self.shown = time.perf_counter()
            self._write(self._line())

    def finish(self) -> None:
        if self.t0 is None:
            return                                          # everything came from the cache
        el = time.perf_counter() - self.t0
        n = len(self.done)
        self._write(f"  compiled {n} function{'s' * (n != 1)} in {el:.0f} s", end=True)
        if self.key:
            times = self._load()
            times[self.key] = {"names": self.done, "seconds": round(el, 1)}
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(_times_file()), exist_ok=True)
                with open(_times_file(), "w") as f:
                    json.dump(times, f, indent=1)


@contextlib.contextmanager
def compiling(what: str = "the CPU kernels", key: str | None = None, stream=None):
    """Report numba's compiles inside the block on `stream` (stderr): nothing if every kernel
    comes from the cache. `key` names the configuration, for the estimate of the next time."""
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev):
            progress.on_start(ev)

        def on_end(self, ev):
            progress.on_end(ev)

    progress = _Progress(what, key, stream or sys.stderr)
    _quiet.append(progress)                          # report_later_compiles's lines: not now
    try:
        with event.install_listener("numba:compile", Listener()):
            yield progress
    except BaseException:
        if progress.t0 is not None and progress.tty:
            progress.stream.write("\n")                  # end the progress line; say nothing more
        raise
    finally:
        _quiet.remove(progress)
    progress.finish()


_quiet = []


class _Later:
    """After the first compiles: a line when a kernel starts compiling, one when it is done."""

    def __init__(self, stream):
        self.stream, self.depth, self.t0, self.said = stream, 0, 0.0, False

    def on_start(self, event):
        self.depth += 1
        if self.depth == 1:
            self.said = not _quiet and _ours(event.data["dispatcher"])
        if self.depth == 1 and self.said:
            self.t0 = time.perf_counter()
            self.stream.write(f"\n(minfer: compiling {_kernel_name(event.data['dispatcher'])}, "
                              f"needed for the first time; once, then cached ...")
            self.stream.flush()

    def on_end(self, event):
        self.depth -= 1
        if self.depth == 0 and self.said:
            self.stream.write(f" {time.perf_counter() - self.t0:.0f} s)\n")
            self.stream.flush()


_later = []


def report_later_compiles(stream=None) -> None:
    """From now on, for the rest of the process, say so whenever numba compiles a kernel."""
    if _later:
        return
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev):
            later.on_start(ev)

        def on_end(self, ev):
            later.on_end(ev)

    later = _Later(stream or sys.stderr)
    _later.append(Listener())
    event.register("numba:compile", _later[0])
