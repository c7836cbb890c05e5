"""One-process A/B of greedy steps: the LM head's arg-max found from int8 x and a bound
(cpu/greedy_head.py, CpuModel.forward_argmax) against the whole three-part head, turn by turn.

    python tools/greedy_head_ab.py                 # default model, numba, 6 rounds
    python tools/greedy_head_ab.py --rows 2,4,9 --no-answers

1. forwards of 9, 17 and 33 (--rows) tokens of the bench's edit answer after its prompt:
   forward() and np.argmax of its logits, against forward_argmax at any row count (the same ids:
   checked);
2. whole answers, the arg-max head on (the default) and off (KernelConfig.argmax_head_rows never):
   the edit workload with n-gram guesses, and 32 greedy stories at once — decode tok/s, and
   whether the text is the same.

Each measurement alternates the two (in swapped order each round), so that a noisy minute on a
shared machine lands on both; medians and their ratio. Only a CPU with AVX-512 VNNI runs the
arg-max head (float32 x in three int8 parts); elsewhere there is nothing to compare.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

import minfer
from minfer.batch import make_batch
from minfer.bench import SPEC_WORKLOADS


def _turns(rounds: int, a, b) -> tuple[list, list]:
    """a(), b() each round, the order swapped every round (the first round a warm-up)."""
    ta, tb = [], []
    for r in range(rounds + 1):
        for f, out in ((a, ta), (b, tb)) if r % 2 else ((b, tb), (a, ta)):
            v = f()
            if r:
                out.append(v)
    return ta, tb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF file or HF folder (default: the default model)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rows", default="9,17,33", help="row counts of the timed forwards (comma-separated)")
    ap.add_argument("--no-answers", action="store_true", help="the forwards only")
    a = ap.parse_args()
    try:
        sizes = [int(r) for r in a.rows.split(",")]
    except ValueError:
        ap.error(f"--rows: comma-separated whole numbers, got {a.rows!r}")
    if a.rounds < 1 or min(sizes) < 1 or max(sizes) > 128:
        ap.error("--rounds must be at least 1, and --rows from 1 to 128 (the answer's tokens)")
    llm = minfer.LLM(a.model, backend="numba", quiet=True, speculative="ngram")
    eng = llm.engine
    model, cache, blocks = eng.model, eng.cache, eng.blocks
    on = model.kernels
    off = dataclasses.replace(on, argmax_head_rows=1 << 30)
    anyrows = dataclasses.replace(on, argmax_head_rows=1)
    edit = llm.tokenizer.apply_chat_template([{"role": "user", "content": SPEC_WORKLOADS["edit"]}])
    greedy = minfer.SamplingParams(temperature=0, max_tokens=128)
    c = llm.generate([edit], greedy)[0]
    ids, n0 = list(c.prompt_token_ids) + list(c.token_ids), len(c.prompt_token_ids)
    if max(sizes) > len(c.token_ids):
        ap.error(f"--rows: this model's answer has {len(c.token_ids)} tokens")

    print("1. forwards after the edit prompt, ms (median): forward + np.argmax | forward_argmax")
    table = blocks.ensure(-(1 << 41), n0 + max(sizes))
    model.kernels = anyrows                   # (the arg-max head at any row count, for timing)
    try:
        model.forward(make_batch([(ids[:n0], 0, table)], cache.block_size), cache)
        for n in sizes:
            step = make_batch([(ids[n0:n0 + n], n0, table)], cache.block_size, logits_for=[n])
            if model.forward_argmax(step, cache) is None:
                print(f"   {n} rows: this CPU or model does not take the arg-max head")
                continue

            def timed(f):
                t = time.perf_counter()
                f()
                return time.perf_counter() - t
            plain, fast = _turns(a.rounds * 3,
                                 lambda: timed(lambda: np.argmax(model.forward(step, cache), axis=1)),
                                 lambda: timed(lambda: model.forward_argmax(step, cache)))
            same = (model.forward_argmax(step, cache) == np.argmax(model.forward(step, cache), axis=1)).all()
            p, f = statistics.median(plain) * 1e3, statistics.median(fast) * 1e3
            print(f"   {n:>2} rows: {p:7.2f} | {f:7.2f}   ratio {f / p:.3f}   same ids: {bool(same)}")
    finally:
        blocks.release(-(1 << 41))
        model.kernels = on
    if a.no_answers:
        return

    print("2. whole answers, decode tok/s (median): the whole head | the arg-max head")
    topics = ["a dragon", "the sea", "a robot", "winter", "a city", "music", "a garden", "the moon"]
    stories = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Write a story about {t}, part {i}."}])
               for i in range(4) for t in topics]
    for name, prompts, params in (
            ("edit, n-gram guesses", [edit], greedy),
            ("32 greedy stories", stories, minfer.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))):
        texts = {}

        def answer(kernels, key):
            model.kernels = kernels
            texts.setdefault(key, [x.token_ids for x in llm.generate(prompts, params)])
            return llm.stats.decode_tok_s
        whole, fast = _turns(a.rounds, lambda: answer(off, "off"), lambda: answer(on, "on"))
        model.kernels = on
        w, f = statistics.median(whole), statistics.median(fast)
        print(f"   {name}: {w:7.1f} | {f:7.1f}   ratio {f / w:.3f}   same text: {texts['on'] == texts['off']}")


if __name__ == "__main__":
    main()
