"""The bridge between the HTTP app (asyncio) and the engine (one thread that steps it).

    HTTP handler --submit()--> incoming deque --+
                                                |  engine thread: add_request, step, step, ...
    HTTP handler <--its own asyncio.Queue-------+  (tokens handed over with call_soon_threadsafe)
    HTTP handler --cancel()--> aborts deque ----+  (a client went away: abort, blocks freed)

One thread owns the engine: it adds what came in, aborts what was cancelled, and steps while
anything is unfinished, so a forward pass never runs on the event loop (which keeps answering
other clients meanwhile). The sequences not yet running (prompts x n of each request) are
bounded: past `max_waiting` a new request is refused at once (the app answers 503 with
Retry-After) instead of waiting without limit.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine import Sequence
from ..errors import InvalidArgumentError
from ..sampling import SamplingParams

log = logging.getLogger("minfer.server")


class ServerBusy(Exception):
    """Too many requests wait already; come back later."""


@dataclass(eq=False)
class Request:
    """One HTTP request: n sequences (choices) whose events arrive on one asyncio queue as
    (choice index, new token ids, finished?, sequence) or (choice index, None, error message, None)."""
    items: list[tuple[list[int], SamplingParams, object]]      # (prompt ids, params, stop check)
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    cancelled: bool = False

    def post(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:          # the event loop is closed: nobody listens any more
            pass


class Bridge:
    def __init__(self, llm, max_waiting: int = 256, metrics=None):
        self.llm, self.engine = llm, llm.engine
        self.max_waiting = max_waiting
        self.metrics = metrics                  # server.metrics.Metrics or None
        self._incoming: deque[Request] = deque()
        self._cancels: deque[Request] = deque()
        self._owner: dict[int, tuple[Request, int]] = {}    # seq id -> (request, choice index)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="minfer-engine", daemon=True)
        self.stats = self._stats()              # the engine's figures after the latest step

    # --- the app's side (event loop thread) -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort everything still running ("the server is shutting down"), without waiting: the
        server was told to stop (Ctrl-C), and the answers in flight end now, as errors, rather
        than being cut off when its wait for them runs out. Safe from a signal handler."""
        self._stopping = True
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def close(self, timeout: float = 10.0) -> None:
        """Abort everything still running, stop the engine thread."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def n_waiting(self) -> int:
        """Sequences submitted but not running yet (ours not yet handed over + the engine's)."""
        return sum(len(r.items) for r in list(self._incoming)) + len(self.engine.scheduler.waiting)

    def submit(self, items: list[tuple[list[int], SamplingParams, object]]) -> Request:
        """Queue one request's sequences (prompts already checked); its events come on
        request.queue. Raises ServerBusy when the waiting queue is full, InvalidArgumentError when
        the request alone has more sequences than it may ever hold."""
        if self._stopping:
            raise ServerBusy("the server is shutting down")
        if len(items) > self.max_waiting:     # never fits: a retry would not help
            raise InvalidArgumentError(
                f"this request has {len(items)} sequences (prompts x n) and at most "
                f"{self.max_waiting} may wait at once (the server's --max-waiting): send fewer")
        if self.n_waiting + len(items) > self.max_waiting:
            raise ServerBusy(f"{self.n_waiting} sequences are waiting already (the server's limit "
                             f"is {self.max_waiting}); try again shortly")
        req = Request(items, asyncio.get_running_loop())
        self._incoming.append(req)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away (or the answer is complete): abort what is unfinished. Idempotent."""
        if req.cancelled:
            return
        req.cancelled = True
        if any(not s.finished for s in req.seqs) or not req.seqs:
            self._cancels.append(req)
            self._wake.set()

    # --- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        while True:
            self._wake.clear()
            self._take_incoming()
            if self._stopping:
                self._abort_all("the server is shutting down")
                return
            if not eng.has_unfinished():
                self.stats = self._stats()
                self._wake.wait(0.5)
                continue
            try:
                with eng.lock:
                    outs = eng.step()
                    stuck = not outs and not eng.scheduler.running and eng.scheduler.waiting
            except Exception as e:                  # a bug, not bad input: fail what runs, go on
                log.exception("engine step failed")
                self._abort_all(f"the engine failed: {type(e).__name__}: {e}")
                continue
            for seq, new in outs:
                self._deliver(seq, new)
            if stuck:
                self._abort_all("the engine has requests it cannot schedule")
            self.stats = self._stats()

    def _take_incoming(self) -> None:
        eng = self.engine
        while self._incoming:
            req = self._incoming.popleft()
            if req.cancelled:
                continue
            with eng.lock:
                for i, (ids, params, stop_check) in enumerate(req.items):
                    try:
                        seq = eng.add_request(ids, params, stop_check)
                    except Exception as e:        # checked before, so unexpected: tell the client
                        req.post((i, None, str(e), None))
                        continue
                    seq.metrics.arrival = req.arrival     # TTFT counts the time queued here too
                    req.seqs.append(seq)
                    self._owner[seq.seq_id] = (req, i)
        while self._cancels:
            req = self._cancels.popleft()
            with eng.lock:
                for seq in req.seqs:
                    if seq.seq_id in eng.seqs:
                        eng.abort(seq.seq_id)
                        self._finished(seq)

    def _deliver(self, seq: Sequence, new: list[int]) -> None:
        owner = self._owner.get(seq.seq_id)
        if owner is None:
            return
        req, i = owner
        finished = seq.finished
        req.post((i, list(new), finished, seq))
        if finished:
            self._finished(seq)

    def _finished(self, seq: Sequence) -> None:
        self._owner.pop(seq.seq_id, None)
        if self.metrics is not None:
            self.metrics.observe(seq)

    def _abort_all(self, message: str) -> None:
        eng = self.engine
        with eng.lock:
            for sid, (req, i) in list(self._owner.items()):
                if sid in eng.seqs:
                    eng.abort(sid)
                seq = next((s for s in req.seqs if s.seq_id == sid), None)
                if seq is not None:
                    self._finished(seq)
                req.post((i, None, message, None))
            while self._incoming:
                req = self._incoming.popleft()
                for i in range(len(req.items)):
                    req.post((i, None, message, None))
        self.stats = self._stats()

    def _stats(self) -> dict:
        with self.engine.lock:
            s = self.engine.stats()
        s["waiting"] += sum(len(r.items) for r in list(self._incoming))
        return s
