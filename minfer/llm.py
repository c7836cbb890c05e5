"""The public API: `LLM` loads a model once and answers prompts and chats.

    llm = minfer.LLM()                                   # the default model, SmolLM2-135M-Instruct
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   minfer.SamplingParams(temperature=0))
    print(out.text)
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import backends
from .backends import DEFAULT_BACKEND, get_ops
from .engine import Engine, Metrics, Sequence
from .engine.engine import DEFAULT_KV_CACHE_MB, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_SEQS
from .errors import InvalidArgumentError, PromptTooLongError
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, _short
from .weights import fetch
from .weights.load import load, scales_for_kernels


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None      # "stop" or "length"
    metrics: Metrics | None = None  # time to first token, inter-token latencies, cached tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache."""
        return self.metrics.cached_prompt_tokens if self.metrics else 0


@dataclass
class Stats:
    """Figures of the last generate / stream call (all its requests together)."""
    prompt_tokens: int = 0             # prefilled (those found in the prefix cache not counted)
    reused_tokens: int = 0             # found in the prefix cache
    generated_tokens: int = 0          # sampled, an ending EOS included (token_ids leave it out)
    prefill_s: float = 0.0             # first scheduled -> first token
    decode_s: float = 0.0              # first token -> last token
    requests: int = 0

    @classmethod
    def of(cls, seqs: list[Sequence]) -> "Stats":
        ms = [s.metrics for s in seqs if s.metrics.first_token is not None]
        if not ms:
            return cls()
        start = min(m.first_scheduled for m in ms)
        first = max(m.first_token for m in ms)
        return cls(prompt_tokens=sum(len(s.prompt_ids) - s.metrics.cached_prompt_tokens for s in seqs),
                   reused_tokens=sum(s.metrics.cached_prompt_tokens for s in seqs),
                   generated_tokens=sum(len(m.token_times) for m in ms),
                   prefill_s=first - start,
                   decode_s=max(m.token_times[-1] for m in ms) - first,
                   requests=len(ms))

    @property
    def decode_tok_s(self) -> float:
        # each request's first token comes from its prefill; decode speed counts those after it
        n = self.generated_tokens - self.requests
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


def _shown(v) -> str:
    """A value for an error message: its type, and its start."""
    return f"{type(v).__name__} {_short(v)}"


def _check_params(p) -> SamplingParams:
    if not isinstance(p, SamplingParams):
        raise InvalidArgumentError("sampling params must be minfer.SamplingParams (e.g. "
                                   f"SamplingParams(max_tokens=64)), got {type(p).__name__}")
    return p


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, backend: str = DEFAULT_BACKEND,
                 quant: str = "auto", max_context: int | None = None, block_size: int = 16,
                 threads: int | None = None, quiet: bool = False, activations: str = "f32",
                 kv_cache_mb: float = DEFAULT_KV_CACHE_MB, max_seqs: int = DEFAULT_MAX_SEQS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, prefix_caching: bool = True,
                 speculative: str = "off", num_speculative_tokens: int | None = None,
                 draft_model: str | os.PathLike | None = None, make_model=None, kernels=None):
        """backend: "numba" (default), "numpy" (the reference) or "cuda".
        quant: "auto" computes on the file's own quantized blocks (float32 on the numpy backend,
        whose reference path dequantizes); "f32", "q8_0", "q4_0", "q4_1" convert at load.
        activations: "f32" (default: the exact function of the weights) or "int8" (numba only:
        the matmuls on quantized weights round x to int8 per 32-block, llama.cpp's scheme —
        faster, ~1% error; needs AVX-512 VNNI).
        kv_cache_mb: the KV-cache pool, allocated once; max_seqs: sequences in one step at most;
        max_batch_tokens: tokens in one step at most (long prompts are computed in chunks);
        prefix_caching: requests that begin with the same tokens share their cached blocks.
        speculative: "off", "ngram" (guesses from earlier text) or "draft" (a draft model guesses:
        draft_model, by default this model's file in its 4-bit blocks — or as Q4_0 — with int8
        activations where the numba backend has VNNI, else float32 ones; on the numpy backend,
        which computes on dequantized weights, the built-in draft is the model itself); up to
        num_speculative_tokens guesses a step (spec/): the same greedy text, the same
        distribution when sampling — with n-gram guesses a seed's text too; with a draft's, a
        seed's text can differ from run to run (how many guesses a step sends follows measured
        timings, and each guess draws its own numbers).
        make_model: a function (config, weights) -> model, run instead of the backend's own
        (backends.make_model); the exercises pass classroom.student_model: model.py's loop on
        the student's functions.
        kernels: which numba kernels run where (stages.quant_dispatch.KernelConfig: the split
        kernels on or off, from how many rows on tiles and sgemm take over); default: the
        measured choices for this CPU, KernelConfig()."""
        from .spec import MODES
        from .stages.quant_dispatch import KernelConfig
        path_kind = (str, os.PathLike)
        for name, v, kinds, what in (("model", model, path_kind, "a path"),
                                     ("draft_model", draft_model, path_kind, "a path"),
                                     ("kernels", kernels, KernelConfig, "a KernelConfig")):
            if v is not None and not isinstance(v, kinds):
                raise InvalidArgumentError(f"{name} must be {what} (or None), got {_shown(v)}")
        if isinstance(model, str) and not model.strip():
            raise InvalidArgumentError("the model path is empty; leave it out for the default model")
        for name, v in (("prefix_caching", prefix_caching), ("quiet", quiet)):
            if not isinstance(v, (bool, np.bool_)):
                raise InvalidArgumentError(f"{name} must be True or False, got {v!r}")
        if speculative not in MODES:
            raise InvalidArgumentError(f"unknown speculative mode {speculative!r}; choose one of: "
                                       f"{', '.join(MODES)}")
        if num_speculative_tokens is not None and not (isinstance(num_speculative_tokens, int)
                                                       and not isinstance(num_speculative_tokens, bool)
                                                       and 1 <= num_speculative_tokens <= 32):
            raise InvalidArgumentError("num_speculative_tokens must be an integer from 1 to 32, "
                                       f"got {num_speculative_tokens!r}")
        if draft_model is not None and speculative != "draft":
            raise InvalidArgumentError("a draft model is for speculative='draft' (--speculative draft)")
        if num_speculative_tokens is not None and speculative == "off":
            raise InvalidArgumentError("num_speculative_tokens is for speculative='ngram' or 'draft' "
                                       "(--speculative ngram|draft)")
        backends.check_threads(threads)
        self.kernels = kernels = kernels or KernelConfig()
        ops = get_ops(backend, threads, activations, kernels)  # validate before the (slow) load
        path = model if model is not None else fetch.ensure_default_model(quiet=quiet)
        self.path = path
        if quant == "auto" and backend == "numpy":
            quant = "f32"
        self.quant = quant
        if activations == "int8" and quant == "f32":      # (said before a long load, too)
            raise InvalidArgumentError("int8 activations need quantized weights (--quant auto on a "
                                       "GGUF with quantized blocks, or q8_0, q4_0, q4_1), not f32")
        self.config, self.weights, self.tokenizer = load(path, quant)
        self.activations = activations
        if activations == "int8" and not self.weights.has_quantized():
            raise InvalidArgumentError("int8 activations need quantized weights (--quant auto on a "
                                       "GGUF with quantized blocks, or q8_0, q4_0, q4_1)")
        # float16 scales where the kernels widen them in registers
        self.weights = scales_for_kernels(self.weights, backend, activations, kernels)
        self.backend = backend
        self.model = (make_model(self.config, self.weights) if make_model is not None
                      else backends.make_model(backend, self.config, self.weights, ops, activations,
                                               kernels, threads))
        self.engine = Engine(self.model, self.tokenizer.stop_ids, max_context, block_size,
                             kv_cache_mb, max_seqs, max_batch_tokens, prefix_caching)
        self.draft = None
        if speculative != "off":
            self._speculate(speculative, num_speculative_tokens, draft_model, threads, kv_cache_mb,
                            max_seqs)
        self.stats = Stats()
        self._outbox: dict[int, deque] = {}      # seq id -> (sequence, new ids) not yet taken

    def _speculate(self, mode, k, draft_model, threads, kv_cache_mb, max_seqs) -> None:
        from .spec import DEFAULT_K, DraftProposer, NgramProposer, Speculator
        if mode == "ngram":
            proposer = NgramProposer()
        else:
            if draft_model is None:          # the built-in pairing: this file, cheaper
                from .stages import simd
                int8 = self.backend == "numba" and simd.has_vnni()
                # the file's own 4-bit blocks where it has them (the exact weights: only the int8
                # activations differ), else its weights as Q4_0
                kinds = {getattr(t, "type", "") for t in self.weights.raw.values()}
                own = "auto" if kinds & {"Q4_0", "Q4_1"} else "q4_0"
                if self.quant == own and self.activations == ("int8" if int8 else "f32"):
                    raise InvalidArgumentError(
                        "the built-in draft is this model in its cheapest form, which it already "
                        "runs in: use --speculative ngram, another --quant (f32 or q8_0: the "
                        "exact model), or --draft-model PATH")
                self.draft = LLM(self.path, backend=self.backend, quant=own,
                                 activations="int8" if int8 else "f32", threads=threads, quiet=True,
                                 kv_cache_mb=kv_cache_mb, max_seqs=max_seqs, kernels=self.kernels)
            else:
                if not Path(draft_model).expanduser().exists():
                    from .errors import ModelNotFoundError
                    raise ModelNotFoundError(
                        f"no draft model at {draft_model} (--draft-model); pass a .gguf file or a "
                        f"Hugging Face folder, or leave it out for the built-in draft")
                self.draft = LLM(draft_model, backend=self.backend, threads=threads, quiet=True,
                                 kv_cache_mb=kv_cache_mb, max_seqs=max_seqs, kernels=self.kernels)
            if self.draft.config.vocab_size != self.config.vocab_size:
                raise InvalidArgumentError(
                    f"the draft model has {self.draft.config.vocab_size} tokens, the model "
                    f"{self.config.vocab_size}: a draft must share the tokenizer")
            proposer = DraftProposer(self.draft.engine)
        self.engine.speculator = Speculator(self.engine, proposer, k or DEFAULT_K)

    # --- prompts -------------------------------------------------------------------------------
    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            # a text far longer than the context: tokenize only its start (the tokenizer holds
            # the GIL — a server's other clients wait — and its memory grows with the text)
            n = self.engine.max_context
            head = 8 * n                              # characters; ~4 a token in English
            if len(prompt) > head:
                ids = self.tokenizer.encode(prompt[:head], add_special_tokens=True)
                if len(ids) > n + 1:                   # (the cut may split one token in two)
                    raise PromptTooLongError(
                        f"the prompt has more than {len(ids) - 1} tokens but at most {n - 1} fit: "
                        f"{self.engine._context_set_by}, one of them for the answer; shorten it")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (bytes, bytearray)):
            raise InvalidArgumentError("a prompt is a string or a list of token ids, not bytes "
                                       "(decode it first, e.g. prompt.decode('utf-8'))")
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and prompt.dtype.kind in "iu":
            return [int(i) for i in prompt]
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in prompt):
            raise InvalidArgumentError("a prompt is a string or a list of token ids (whole numbers), "
                                       f"got {_shown(prompt)}")
        return [int(i) for i in prompt]

    def _stop_check(self, params: SamplingParams):
        if not params.stop:
            return None

        # only the tail can hold a new match: a token is at least one byte of text, so a stop
        # string of b bytes lies within its last b tokens (and a few more: special tokens are none)
        n = max(len(s.encode("utf-8", "surrogatepass")) for s in params.stop) + 8

        def check(seq: Sequence) -> bool:
            tail = self.tokenizer.decode(seq.output_ids[-n:])
            return any(s in tail for s in params.stop)
        return check

    def _finish(self, seq: Sequence) -> Completion:
        text = self._cut_stop(self.tokenizer.decode(seq.output_ids), seq.params)
        return Completion(text, list(seq.output_ids), list(seq.prompt_ids), seq.finish_reason,
                          seq.metrics)

    # --- driving the engine ------------------------------------------------------------------------
    def _submit(self, prompts: list, params: list[SamplingParams], seqs: list[Sequence]) -> None:
        """Queue the prompts, each appended to seqs as it is queued (so that whatever was queued
        is known to the caller, should an exception come half-way)."""
        for p in params:
            _check_params(p)
        ids = [self._ids(p) for p in prompts]          # every prompt checked before any is queued
        for i in ids:
            self.engine.check_prompt(i)
        for i, p in zip(ids, params):
            with self.engine.lock:         # its outbox must exist before any step serves it
                seq = self.engine.add_request(i, p, self._stop_check(p), into=seqs)
                self._outbox[seq.seq_id] = deque()

    def _drop(self, seqs: list[Sequence]) -> None:
        """Abort what is unfinished of seqs; forget their outboxes."""
        with self.engine.lock:
            for s in seqs:
                if s.seq_id in self.engine.seqs:
                    self.engine.abort(s.seq_id)
                self._outbox.pop(s.seq_id, None)

    def _run(self, prompts: list, params: list[SamplingParams], seqs: list[Sequence]
             ) -> Iterator[tuple[Sequence, int]]:
        """Queue the prompts (into seqs) and step the engine until they are finished, yielding
        (sequence, new token id) as they come. Several threads may do this at once on one LLM:
        whoever holds the engine's lock steps for all, and each new token goes to its own
        request's outbox. Stopping early (Ctrl-C, an exception, the caller's generator closed or
        collected) aborts the unfinished ones and frees their blocks. Nothing is queued before
        the first token is asked for, and from then on everything queued is in seqs, inside the
        try: no request is left running whatever the moment an exception comes."""
        try:
            self._submit(prompts, params, seqs)
            boxes = {s.seq_id: self._outbox[s.seq_id] for s in seqs}
            pending = set(boxes)
            while pending:
                for sid in list(pending):
                    box = boxes[sid]
                    while box:
                        seq, new = box.popleft()
                        for tok in new:
                            yield seq, tok
                        if seq.finished:
                            pending.discard(sid)
                if not pending:
                    break
                with self.engine.lock:
                    if any(boxes[sid] for sid in pending):
                        continue                     # another thread's step brought news
                    outs = self.engine.step()
                    if not outs and not self.engine.scheduler.running:
                        raise RuntimeError("the engine has requests it cannot schedule")
                    for seq, new in outs:
                        box = self._outbox.get(seq.seq_id)
                        if box is not None:
                            box.append((seq, new))
        except GeneratorExit:                   # closed at a yield: nothing was half-done
            raise
        except BaseException:
            self._drop(seqs)
            self.engine.repair()          # an exception may have come mid-bookkeeping
            raise
        finally:
            self._drop(seqs)
            self.stats = Stats.of(seqs)

    # --- generation ----------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """One completion per prompt. A prompt is a string (used as is, no chat template) or a list
        of token ids; params is one SamplingParams for all or a list, one per prompt. The prompts
        run together through the engine (continuous batching: a short answer leaves the batch as
        soon as it is done)."""
        if isinstance(prompts, (str, bytes)) or (isinstance(prompts, np.ndarray) and prompts.ndim == 1) or (
                isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        try:
            if isinstance(prompts, (dict, set, frozenset)):     # (its keys, in no promised order)
                raise TypeError
            prompts = list(prompts)
        except TypeError:
            raise InvalidArgumentError("prompts: a string, a list of token ids, or a list of those; "
                                       f"got {type(prompts).__name__}") from None
        if not prompts:
            return []
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise InvalidArgumentError(f"{len(params)} sampling params for {len(prompts)} prompts")
            plist = list(params)
        else:
            plist = [params or SamplingParams()] * len(prompts)
        seqs: list[Sequence] = []
        for _ in self._run(prompts, plist, seqs):
            pass
        return [self._finish(s) for s in seqs]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        """OpenAI-style messages [{"role": "user", "content": "..."}] -> the assistant's answer.
        A conversation's next turn finds its earlier turns in the prefix cache (whole blocks of
        16 tokens) and prefills little more than the new message."""
        return self.generate([self._chat_prompt(messages)], params)[0]

    def _chat_prompt(self, messages) -> str:
        if isinstance(messages, (list, tuple)) and not messages:
            raise InvalidArgumentError("messages is empty: a conversation needs at least one message")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text piece by piece (never half a UTF-8 character, but where
        max_tokens cuts one: U+FFFD, as generate gives). A bad prompt or params is an error here,
        at the call; the request joins the engine at the first piece asked for. A stream left
        unfinished is aborted when it is closed or collected: while it is still referenced, its
        request goes on running in the other calls' steps — close it (`it.close()`, or
        `contextlib.closing`) when you stop reading early."""
        params = _check_params(params or SamplingParams())
        ids = self._ids(prompt)
        self.engine.check_prompt(ids)
        return self._stream(ids, params)

    def _stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        dec = StreamDecoder(self.tokenizer)
        hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may be forming
        sent = 0
        run = self._run([prompt], [params], [])
        try:
            for _, tok in run:
                dec.push(tok)
                text = self._cut_stop(dec.text, params)
                upto = len(text) if len(text) < len(dec.text) else max(sent, len(text) - hold)
                if upto > sent:
                    yield text[sent:upto]
                    sent = upto
            text = self._cut_stop(dec.text + dec.flush(), params)
            if len(text) > sent:
                yield text[sent:]
        finally:
            run.close()  # frees the KV blocks even when the caller stops early (Ctrl-C)

    @staticmethod
    def _cut_stop(text: str, params: SamplingParams) -> str:
        cut = [text.find(s) for s in params.stop if s in text]
        return text[:min(cut)] if cut else text

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        return self.stream(self._chat_prompt(messages), params)

    # --- raw model -----------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """float32 [len(token_ids), vocab]: the next-token logits at every position."""
        return self.engine.logits(self._ids(token_ids))
