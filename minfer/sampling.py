"""From logits to the next token.

    logits --repetition penalty--> --/temperature--> --top-k--> --top-p--> --min-p--> softmax -> draw

Temperature 0 means greedy: take the arg-max (after the repetition penalty); so does a
temperature below MIN_TEMPERATURE, where the draw is the arg-max but for near-ties (and a far
smaller one would overflow float32 when it divides the logits). Each filter removes unlikely
tokens by setting their logit to -inf; the order is the one Hugging Face uses.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidArgumentError

MIN_TEMPERATURE = 1e-4   # a smaller temperature > 0 is greedy (temperature 0)
MIN_PENALTY = 0.01       # repetition_penalty in [MIN_PENALTY, 1 / MIN_PENALTY]


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 0                 # keep the k most likely tokens (0: off)
    top_p: float = 1.0             # keep the smallest set whose probability reaches p (1: off)
    min_p: float = 0.0             # drop tokens less likely than min_p x the top one (0: off)
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or the output
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop when the text produces one of these
    seed: int | None = None        # the same draws, the same text (with a draft model's guesses:
                                   # the same distribution; guesses per step vary, each draws)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:                     # (vLLM's and OpenAI's "no stop strings")
            self.stop = []
        num = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
        checks = [
            (num(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature!r}"),
            (whole(self.top_k) and self.top_k >= 0, f"top_k must be a whole number >= 0, got {self.top_k!r}"),
            (num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (num(self.min_p) and 0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p!r}"),
            (num(self.repetition_penalty)
             and MIN_PENALTY <= self.repetition_penalty <= 1 / MIN_PENALTY,
             f"repetition_penalty must be in [{MIN_PENALTY}, {1 / MIN_PENALTY:g}] (1: off), got "
             f"{self.repetition_penalty!r}"),
            (whole(self.max_tokens) and self.max_tokens >= 1,
             f"max_tokens must be a whole number >= 1, got {self.max_tokens!r}"),
            (isinstance(self.stop, (list, tuple)) and all(isinstance(t, str) for t in self.stop),
             f"stop must be a string or a list of strings, got {self.stop!r}"),
            (all(t != "" for t in self.stop) if isinstance(self.stop, (list, tuple)) else True,
             "a stop string must not be empty (it would end every answer before its first token)"),
            (self.seed is None or (whole(self.seed) and self.seed >= 0),
             f"seed must be a whole number >= 0 (or None for a random one), got {self.seed!r}"),
            (isinstance(self.ignore_eos, (bool, np.bool_)),
             f"ignore_eos must be True or False, got {self.ignore_eos!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidArgumentError(msg)
        self.stop = list(self.stop)
        if self.temperature < MIN_TEMPERATURE:
            # below this the draw is the arg-max but for near-ties (and ~1e-37 would overflow)
            self.temperature = 0.0
        # above float32's largest the logits (float32) could not be divided by it; long before,
        # every token is as likely as any other
        self.temperature = min(self.temperature, float(np.finfo(np.float32).max))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_argmax(self) -> bool:
        """Is the next token np.argmax of the raw logits (greedy, no repetition penalty)? A model
        may then find it without all the logits (cpu/greedy_head.py)."""
        return self.temperature == 0 and self.repetition_penalty == 1


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style (Keskar et al., 2019): positive logits of seen tokens are divided, negative ones
    multiplied, so a seen token always becomes less likely."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    logits = logits.copy()
    s = np.unique(seen)
    logits[s] = np.where(logits[s] > 0, logits[s] / penalty, logits[s] * penalty)
    return logits


def filter_logits(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """logits [V] (already divided by the temperature) -> logits with dropped tokens at -inf."""
    logits = logits.astype(np.float64)
    if 0 < p.top_k < len(logits):
        kth = logits[largest(logits, p.top_k)].min()                 # the k-th largest logit
        logits[logits < kth] = -np.inf
    if p.top_p < 1.0:
        probs = _softmax(logits)
        # Only the most likely tokens can survive, so sort just enough of them: candidates are the
        # k largest for k = 64, 256, ... until they hold top_p of the mass (sorting all 49,152
        # logits for every token would cost more than the rest of a decode step).
        k, V = 64, len(probs)
        while True:
            if 4 * k > V:                                           # a flat distribution: sort all
                cand = np.arange(V)
                break
            cand = largest(probs, k)
            if probs[cand].sum() >= p.top_p:
                break
            k *= 4
        order = cand[np.argsort(-probs[cand])]                      # most likely first
        # keep a token while the mass before it is < top_p (the top token is always kept)
        keep = order[np.cumsum(probs[order]) - probs[order] < p.top_p]
        kept = np.full_like(logits, -np.inf)
        kept[keep] = logits[keep]
        logits = kept
    if p.min_p > 0.0:
        probs = _softmax(logits)
        logits[probs < p.min_p * probs.max()] = -np.inf
    return logits


def largest(v: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of v, in no order (which of several equal to the k-th:
    any) — np.argpartition(-v, k)[:k], which partitions all 49,152 logits. The k-th largest of
    every 16th value is a lower bound for v's own (those k values are in v too), so only the
    values above it, ~16 k of them, need partitioning."""
    if 16 * k >= len(v):
        return np.argpartition(-v, k - 1)[:k]
    bound = np.partition(v[::16], -k)[-k]
    cand = np.flatnonzero(v >= bound)                                # holds v's k largest
    return cand[np.argpartition(-v[cand], k - 1)[:k]]


def draw(probs: np.ndarray, u: float, block: int = 256) -> int:
    """The token where the running sum of probs first exceeds u * sum(probs), u in [0, 1): the
    draw rng.choice(len(probs), p=probs) makes from u = rng.random() (inverse transform
    sampling), without its checks and its running sum over the whole vocabulary. In two steps
    (docs/benchmarks.md has the times): which block of `block` tokens (a running sum over the
    blocks' sums), then which token in that block."""
    starts = np.arange(0, len(probs), block)
    cum = np.cumsum(np.add.reduceat(probs, starts))                  # mass up to each block's end
    target = u * cum[-1]
    b = int(np.searchsorted(cum, target, side="right"))              # the block it falls in
    if b < len(cum):
        inside = (cum[b - 1] if b else 0.0) + np.cumsum(probs[starts[b]:starts[b] + block])
        i = int(np.searchsorted(inside, target, side="right"))
        if i < len(inside):
            return int(starts[b] + i)
    # rounding carried the target past the end (of its block, or of all): the last token there
    # that has a probability — never a filtered-out one
    return int(np.flatnonzero(probs[:starts[b] + block] if b < len(cum) else probs)[-1])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def kept_softmax(x: np.ndarray, p: SamplingParams) -> tuple:
    """x [V] from filter_logits -> (kept, probs): the softmax over the tokens the filters kept,
    kept [n] their ids (None: no filter ran, probs [V] over all). The filters keep few tokens
    (at temperature 0.2 and top-p 0.9, often 1 to 3 of 49,152): the dropped ones have
    probability 0, so this is the same distribution without an exp over the whole vocabulary."""
    if not (0 < p.top_k < len(x) or p.top_p < 1.0 or p.min_p > 0.0):
        return None, _softmax(x)
    kept = np.flatnonzero(x > -np.inf)
    return kept, _softmax(x[kept])


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> int:
    """logits [V] of one sequence -> the next token id."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        return int(np.argmax(logits))
    kept, probs = kept_softmax(filter_logits(logits / p.temperature, p), p)
    i = draw(probs, rng.random())
    return i if kept is None else int(kept[i])
