"""Ctrl-C while the model computes: hold it until the step is done.

Python runs a signal handler between bytecodes of the main thread. A forward step on the numba
backend is one long compiled call (the first one also compiles the kernels), and a
KeyboardInterrupt raised at the wrong moment inside it — while numba's threads run, or while
LLVM compiles — ends in a SystemError or a crash instead of a clean stop. So during a step the
handler only notes that Ctrl-C came; the KeyboardInterrupt is raised once the step returns, where
the engine's state is whole again (a step either happened or it did not). A handler of the
program's own (a timeout's SIGALRM) is not held back: what it raises inside a compiled call comes
out of numba as a SystemError, which `own_exception` turns back into the handler's exception.

The command line installs `on_sigint` first thing (python -m minfer): it behaves as Python's own
handler, and remembers that Ctrl-C came — an import that a Ctrl-C broke half-way can surface as
an ImportError, which is then known to be an interrupt, not a broken installation. While a
module is being imported it holds Ctrl-C too, until the import is done: C extensions import
numpy from their own initialisation (numba's `import_array()`) and print any error there as a
traceback before they fail — a Ctrl-C at that moment would show one.
"""
from __future__ import annotations

import _signal   # signal.signal's C core: the public wrapper converts to enums on each call,
                 # which would cost more than the rest of a decode step's bookkeeping
import os
import signal
import sys
import threading
from contextlib import contextmanager

_SIGINT = int(signal.SIGINT)
AGAIN_S = 0.05                   # a Ctrl-C held by an import comes back this much later
received = False                 # a Ctrl-C came while on_sigint was the handler
_held = False                    # one is held now (an import was under way)


def _importing(frame) -> bool:
    """Is a module being imported at this frame (importlib's machinery on the stack)?"""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _again() -> None:
    global _held
    _held = False
    os.kill(os.getpid(), _SIGINT)


def on_sigint(signum, frame):
    """Python's default behaviour (KeyboardInterrupt), remembered in `received`; during an
    import, once the import is done (the signal sent again a moment later, until no import is
    under way)."""
    global received, _held
    received = True
    if _importing(frame):
        if not _held:                # (a second Ctrl-C meanwhile: still one KeyboardInterrupt)
            _held = True
            timer = threading.Timer(AGAIN_S, _again)
            timer.daemon = True
            timer.start()
        return
    raise KeyboardInterrupt


def install() -> None:
    signal.signal(signal.SIGINT, on_sigint)


@contextmanager
def own_exception():
    """A signal handler of the program's own (a timeout's SIGALRM, say) that raises while a
    compiled kernel runs: the kernel's call returns with that exception set, which Python
    reports as "SystemError: ... returned a result with an exception set", the handler's
    exception as its cause. Raise the handler's exception itself."""
    try:
        yield
    except SystemError as e:
        inner = e                       # (numba's own Python helpers can wrap it once more)
        while (isinstance(inner, SystemError) and "with an exception set" in str(inner)
               and isinstance(inner.__cause__, BaseException)):
            inner = inner.__cause__
        if inner is e:
            raise
        raise inner from None


@contextmanager
def deferred_sigint():
    """Delay SIGINT to the end of the block (main thread with Python's own handler or
    on_sigint; elsewhere a no-op: other threads never receive KeyboardInterrupt, and a custom
    handler is respected — its exception is the caller's, not a SystemError: own_exception)."""
    before = _signal.getsignal(_SIGINT)
    if (threading.current_thread() is not threading.main_thread()
            or before not in (signal.default_int_handler, on_sigint)):
        with own_exception():
            yield
        return
    caught = []

    def hold(signum, frame):
        caught.append(signum)
        if len(caught) == 2:             # pressed again: the step is a long one (compiling?)
            print("minfer: stopping as soon as this step is done (the kernels may be compiling)",
                  file=sys.stderr, flush=True)
    _signal.signal(_SIGINT, hold)
    try:
        with own_exception():
            yield
    finally:
        _signal.signal(_SIGINT, before)
        if caught:
            before(_SIGINT, None)        # raises KeyboardInterrupt
