"""How many threads run the one-region step, when other programs take cores.

region.py's threads meet after every stage of a step (~180 times a decode step of SmolLM2-135M).
When another program keeps a core busy, the operating system shares that core between it and one
of minfer's threads; while that thread waits for its turn, the others wait for it at the next
meeting, and a step takes several times as long. On fewer threads, each with a core to itself, a
step is faster (docs/benchmarks.md, "Other programs on the cores").

Linux counts, for every thread, the time it was ready to run but had no core
(/proc/self/task/*/schedstat, its second number). Summed over the process's threads over a
quarter of a second, it is how many of them were waiting, on average: ~0 when the cores are
free, ~0.8 on a 2-core machine with one busy program beside minfer's two threads. From half a
thread on, the next steps run on fewer threads; now and then a quarter of a second on all of
them tries again, and keeps them if fewer waited. Where there is no such count (not Linux),
every step runs on all.

The text does not depend on it: a stage's items are the same whichever thread computes them, and
attention cuts its keys into slices for the model's thread count however many run them (region.py,
_flat), so a step gives the same bits on any number of workers.
"""
from __future__ import annotations

import os
import time

WINDOW = 0.25        # seconds of steps on one worker count that a decision looks at
CROWDED = 0.5        # threads' worth of waiting for a core from which a step runs on fewer
                     # (a server's own HTTP work beside its steps: ~0.15, up to ~0.4 at times;
                     # there the threads all together were still faster)
FIRST_WAIT = 0.5     # seconds on fewer threads before the first try with all
LONGEST_WAIT = 8.0   # ... doubled after each try that found the cores still busy, up to this


def runqueue_wait() -> float | None:
    """Seconds this process's threads have spent ready to run without a core, all together; None
    where the system does not say."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, read = 0, False
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/schedstat", "rb") as f:
                total += int(f.read().split()[1])              # nanoseconds
            read = True
        except (OSError, ValueError, IndexError):              # a thread that ended meanwhile
            continue
    return total / 1e9 if read else None


class ThreadGovernor:
    """threads: the most a step runs on. workers() -> how many the next step runs on;
    observe(workers) after it. clock and waited: time.monotonic and runqueue_wait (tests give
    their own)."""

    def __init__(self, threads: int, clock=time.monotonic, waited=runqueue_wait):
        self.threads, self.clock, self.waited = threads, clock, waited
        self.enabled = threads > 1 and waited() is not None
        self.n = threads                   # workers while no try is due
        self.wait, self.until = FIRST_WAIT, 0.0
        self._window = None                # (workers, its start, the waiting then)

    def workers(self) -> int:
        if self.enabled and self.n < self.threads and self.clock() >= self.until:
            return self.threads            # a try with them all
        return self.n

    def observe(self, workers: int) -> None:
        if not self.enabled:
            return
        now, w = self.clock(), self._window
        if w is None or w[0] != workers or now - w[1] > 10 * WINDOW:   # (after an idle spell: anew)
            self._window = (workers, now, self.waited())
            return
        if now - w[1] < WINDOW:
            return
        waited = self.waited()
        self._window = None
        if waited is None or workers != self.threads:
            return                         # on fewer threads: nothing to decide until a try
        crowd = (waited - w[2]) / (now - w[1])      # threads waiting for a core, on average
        trying = self.n < self.threads
        if crowd >= CROWDED:
            self.n = max(1, min(workers - 1, workers - round(crowd)))
            self.wait = min(2 * self.wait, LONGEST_WAIT) if trying else FIRST_WAIT
            self.until = now + self.wait
        elif trying:                       # the cores are free again
            self.n, self.wait = self.threads, FIRST_WAIT
