"""A request's state as the engine sees it.

A sequence is its tokens (the prompt, then what was generated) and how many of them have their
keys and values in the KV cache (`n_computed`). Each step the scheduler lets a running sequence
bring the tokens it still lacks — the whole prompt or a chunk of it, later one token at a time —
and once `n_computed` catches up with the tokens, the logits of the last one give the next token.
There is no prefill phase and no decode phase: only this catching up (as in vLLM's scheduler).

    WAITING --admitted--> RUNNING --EOS, stop, max_tokens, context--> FINISHED
                           |   ^
              no free block|   |admitted again (recomputes its tokens)
                           v   |
                          PREEMPTED
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Metrics:
    """Per-request timings (time.perf_counter seconds) and counts, for the caller and for serving."""
    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)   # when each new token was sampled
    cached_prompt_tokens: int = 0      # prompt tokens whose K/V came from the prefix cache
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token: from arrival to the first sampled token."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclass(eq=False)          # two requests are never the same one, even with equal fields
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator
    stop_check: Callable[["Sequence"], bool] | None = None   # e.g. stop strings in the text
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    n_computed: int = 0                # tokens 0..n_computed-1 have their K/V in the cache
    finish_reason: str | None = None   # "stop" (EOS or a stop string), "length", "abort"
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self):
        self.metrics.arrival = time.perf_counter()

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def n_pending(self) -> int:
        """Tokens still to be computed before this sequence can sample its next token."""
        return self.n_tokens - self.n_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
