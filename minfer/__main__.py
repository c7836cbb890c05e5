import sys

from . import interrupt

interrupt.install()                  # Ctrl-C: Python's KeyboardInterrupt, and remembered
try:
    from .cli import main
    code = main()
except KeyboardInterrupt:            # while the modules load: stop quietly, as everywhere
    print(file=sys.stderr)
    code = 130
except ImportError:
    if not interrupt.received:       # a real installation problem: show it
        raise
    print(file=sys.stderr)           # a C extension whose import Ctrl-C broke half-way
    code = 130
raise SystemExit(code)
