"""Ctrl-C while the model computes: hold it until the step is done.

Python runs a signal handler between bytecodes of the main thread. A forward step on the numba
backend is one long compiled call (the first one also compiles the kernels), and a
KeyboardInterrupt raised at the wrong moment inside it — while numba's threads run, or while
LLVM compiles — ends in a SystemError or a crash instead of a clean stop. So during a step the
handler only notes that Ctrl-C came; the KeyboardInterrupt is raised once the step returns, where
the engine's state is whole again (a step either happened or it did not).
"""
from __future__ import annotations

import _signal   # signal.signal's C core: the public wrapper converts to enums on each call,
                 # which would cost more than the rest of a decode step's bookkeeping
import signal
import threading
from contextlib import contextmanager

_SIGINT = int(signal.SIGINT)


@contextmanager
def deferred_sigint():
    """Delay SIGINT to the end of the block (main thread with Python's own handler; elsewhere a
    no-op: other threads never receive KeyboardInterrupt, and a custom handler is respected)."""
    if (threading.current_thread() is not threading.main_thread()
            or _signal.getsignal(_SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    _signal.signal(_SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        _signal.signal(_SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt
