"""How much could prompt lookup (n-gram speculation) give on bench's two prompts? A replay.

    python tools/spec_replay.py                  # default model, numba, 128 new tokens
    python tools/spec_replay.py --new-tokens 256 --k-max 8

The speed-up of speculative decoding is set by two things: which guesses are right, and what a
forward of 1 + k rows costs against a forward of one. This script measures both here and
replays the answer step by step, without the engine's own timing noise:

  1. the greedy answer of each `bench --speculative` prompt (plain decoding: the text any
     speculation must reproduce);
  2. the cost of a forward of r = 1 .. k_max + 1 new rows after a 64-token context (--context:
     another; the fastest of a few, the row counts taking turns; spec/speculator.timed_forwards,
     the measurement of the engine's speculator, which makes it after 64);
  3. a replay of the answer: at each position the n-gram proposer (spec/ngram.py, as the engine
     builds it) looks up its guesses, a policy picks how many to send, the answer says how many
     are right; each step costs the forward of its rows (a plain step after a plain one, a
     decode loop's 1-row forward). Policies: "engine" (the speculator's
     per-sequence rule, spec/speculator._Adapt, on the cost curve it would calibrate), "a cost
     line" (the same rule on a straight line through the costs of 1 and 1 + k_max rows),
     "fixed k",
     and "best": the least time any choice of k could take with these guesses and these costs
     (an oracle that knows which guesses are right; found by dynamic programming).

The printed speed-ups are plain decoding's time over the replay's. Plain decoding is a loop of
1-row forwards, timed as one (on a shared host a forward right after a bigger one is slower
than one in a row of its kind: the replay's own steps are timed in turns, as they come in a
speculating engine, so its 1-row steps cost more than plain decoding's). Not counted: sampling,
Python around the step, the prompt. docs/benchmarks.md ("Speculative decoding") has a run.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minfer import LLM, SamplingParams  # noqa: E402
from minfer.bench import SPEC_WORKLOADS  # noqa: E402
from minfer.spec.ngram import NgramIndex, NgramProposer  # noqa: E402
from minfer.spec.speculator import DEFAULT_K, _Adapt, timed_forwards  # noqa: E402


def lookups(prompt: list, answer: list, k_max: int) -> list:
    """At each position of the answer: (guesses the proposer has, how many of them are right) —
    its index holds the prompt and the answer before that position, whatever was guessed."""
    probe = NgramProposer()
    index = NgramIndex(probe.max_n, probe.min_n)
    index.extend(prompt)
    out = []
    for pos in range(len(answer)):
        guesses = index.propose(k_max)
        right = 0
        while right < len(guesses) and pos + right < len(answer) and guesses[right] == answer[pos + right]:
            right += 1
        out.append((len(guesses), right))
        index.extend(answer[pos:pos + 1])
    return out


def step_cost(costs: dict, loop: float, k: int, after_guesses: bool) -> float:
    """A step with k guesses: the forward of k + 1 rows as timed in turns — but a plain step
    after another plain one as in a decode loop (`loop`)."""
    return costs[k + 1] if k or after_guesses else loop


def best(looked: list, costs: dict, loop: float) -> tuple:
    """The least time any choice of k could take (dynamic programming over the positions and
    whether the step before guessed: from each, send k = 0 .. right guesses) -> (seconds,
    guessing steps)."""
    n = len(looked)
    t = [[0.0, 0.0] for _ in range(n + 1)]          # [pos][the step before guessed]
    steps = [[0, 0] for _ in range(n + 1)]
    for pos in range(n - 1, -1, -1):
        _, right = looked[pos]
        for g in (0, 1):
            nxt = [(step_cost(costs, loop, k, g) + t[min(n, pos + k + 1)][k > 0],
                    (k > 0) + steps[min(n, pos + k + 1)][k > 0]) for k in range(right + 1)]
            t[pos][g], steps[pos][g] = min(nxt)
    return t[0][0], steps[0][0]


def replay(prompt: list, answer: list, costs: dict, loop: float, choose, k_max: int) -> tuple:
    """-> (seconds, verification steps): the answer produced with guesses from an NgramIndex;
    choose(guesses, right) -> how many of the guesses to send (right: how many would be accepted)."""
    probe = NgramProposer()
    index = NgramIndex(probe.max_n, probe.min_n)
    index.extend(prompt)
    pos, seconds, steps, guessed = 0, 0.0, 0, False
    while pos < len(answer):
        guesses = index.propose(k_max)
        right = 0
        while right < len(guesses) and pos + right < len(answer) and guesses[right] == answer[pos + right]:
            right += 1
        k = choose(guesses, right) if guesses else 0
        m = min(k, right)
        seconds += step_cost(costs, loop, k, guessed)
        steps += k > 0
        guessed = k > 0
        index.extend(answer[pos:pos + m + 1])
        pos += m + 1
    return seconds, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF file or HF folder (default: the default model)")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k-max", type=int, default=DEFAULT_K, help="most guesses a step")
    ap.add_argument("--repeats", type=int, default=7,
                    help="forwards timed per row count (the fastest counts)")
    ap.add_argument("--context", type=int, default=64,
                    help="cached tokens before the timed forwards (default 64, as the engine's speculator)")
    a = ap.parse_args()
    for flag, value, least in (("--new-tokens", a.new_tokens, 2), ("--k-max", a.k_max, 1),
                               ("--repeats", a.repeats, 1), ("--context", a.context, 1)):
        if value < least:
            ap.error(f"{flag} must be at least {least}, got {value}")
    llm = LLM(a.model, backend=a.backend, quant=a.quant, quiet=True)
    eng = llm.engine
    most = min(eng.max_context, eng.blocks.n_blocks * eng.blocks.block_size) - a.k_max - 1
    if a.context > most:                   # (timed_forwards would shorten it without a word)
        ap.error(f"--context {a.context} does not fit: at most {most} cached tokens leave room "
                 f"for {a.k_max + 1} new rows in this model's context and KV cache")
    params = SamplingParams(temperature=0, max_tokens=a.new_tokens)
    # one context, the row counts in turns (the host's state moves), the fastest of each: as the
    # speculator's calibration measures them
    costs = timed_forwards(eng.model, eng.cache, eng.blocks, range(1, a.k_max + 2), eng.max_context,
                           a.repeats, a.context)
    # plain decoding: 1-row forwards one after another (the same call with one size)
    loop = timed_forwards(eng.model, eng.cache, eng.blocks, [1], eng.max_context, 4 * a.repeats,
                          a.context)[1]
    print(f"forward of r new rows after a {a.context}-token context, the sizes in turns, ms: "
          + ", ".join(f"{r}: {t * 1e3:.2f}" for r, t in costs.items()))
    print(f"forward of 1 new row in a row of them (plain decoding), ms: {loop * 1e3:.2f}")
    for name, text in SPEC_WORKLOADS.items():
        c = llm.generate([llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])], params)[0]
        prompt, answer = list(c.prompt_token_ids), list(c.token_ids)
        plain = len(answer) * loop
        rows = []
        for k_max in sorted({min(DEFAULT_K, a.k_max), a.k_max}):
            curve = tuple(costs[k + 1] / costs[1] for k in range(k_max + 1))   # as calibrate() finds
            line = tuple(1 + (curve[-1] - 1) / k_max * k for k in range(k_max + 1))
            for rule_name, c in (("engine", curve), ("a cost line", line)):
                adapt = _Adapt(k_max)

                def rule(guesses, right, adapt=adapt, c=c):
                    k = min(adapt.choose(c), len(guesses))
                    if k:
                        adapt.update(k, min(k, right))
                    return k
                rows.append((f"{rule_name}, k_max {k_max}", replay(prompt, answer, costs, loop, rule, k_max)))
        rows.append((f"best, k <= {a.k_max}", best(lookups(prompt, answer, a.k_max), costs, loop)))
        for k in range(1, a.k_max + 1):
            rows.append((f"fixed k = {k}", replay(prompt, answer, costs, loop,
                                                  lambda g, right, k=k: min(k, len(g)), a.k_max)))
        print(f"{name}: {len(answer)} new tokens, plain decoding {plain * 1e3:.0f} ms")
        for n, (t, steps) in rows:
            print(f"  {n:<20} {plain / t:5.2f}x   {t * 1e3:6.0f} ms, {steps} steps with guesses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
