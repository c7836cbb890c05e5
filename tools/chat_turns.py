"""Time to the first token of each turn of a chat, with and without the prefix cache.

    python tools/chat_turns.py                  # default model, numba backend, 5 turns
    python tools/chat_turns.py --rounds 2 --max-tokens 60

A chat sends the whole conversation every turn. Without the prefix cache every turn prefills all
of it, so the wait for the first token grows with the conversation; with it (the default) a turn
finds the earlier turns' full KV blocks and prefills only the rest: about the new message. Greedy
answers, so both ways see the same conversation; rounds alternate the two, so that the shared
machine's drift falls on both alike.
"""
import argparse
import time

import minfer

QUESTIONS = ["Tell me about the history of Paris.", "What about its museums?",
             "Which one is the largest?", "How many visitors does it get?",
             "And what is the best time to visit?"]


def one_chat(llm, params):
    """[(ms to the first token, tokens prefilled, tokens reused)] a turn."""
    llm.engine.blocks.reset_prefix_cache()
    history, turns = [], []
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        t0, first, answer = time.perf_counter(), None, []
        for piece in llm.stream_chat(history, params):
            first = first if first is not None else time.perf_counter() - t0
            answer.append(piece)
        turns.append((first * 1e3, llm.stats.prompt_tokens, llm.stats.reused_tokens))
        history.append({"role": "assistant", "content": "".join(answer)})
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default model)")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--max-tokens", type=int, default=60, help="answer length (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="chats each way (default: %(default)s)")
    a = ap.parse_args()
    for flag, value in (("--max-tokens", a.max_tokens), ("--rounds", a.rounds)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    llms = {reuse: minfer.LLM(a.model, backend=a.backend, quiet=True, prefix_caching=reuse)
            for reuse in (False, True)}
    params = minfer.SamplingParams(temperature=0, max_tokens=a.max_tokens)
    one_chat(llms[True], params)                                   # warm-up: kernels, caches
    for r in range(a.rounds):
        for reuse in (False, True):
            turns = one_chat(llms[reuse], params)
            print(f"{'reuse' if reuse else 'fresh'}  first token, ms: "
                  + "  ".join(f"{ms:5.0f}" for ms, _, _ in turns)
                  + "   prefilled/reused tokens: " + "  ".join(f"{p}/{u}" for _, p, u in turns))


if __name__ == "__main__":
    main()
