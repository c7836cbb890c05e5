"""The public API: `LLM` loads a model once and answers prompts and chats.

    llm = minfer.LLM()                                   # the default model, SmolLM2-135M-Instruct
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   minfer.SamplingParams(temperature=0))
    print(out.text)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .backends import DEFAULT_BACKEND, get_ops
from .engine.generate import Engine, Sequence
from .errors import InvalidArgumentError
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import StreamDecoder
from .weights import fetch
from .weights.load import load, scales_for_kernels


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None      # "stop" or "length"


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, backend: str = DEFAULT_BACKEND,
                 quant: str = "auto", max_context: int | None = None, block_size: int = 16,
                 threads: int | None = None, quiet: bool = False, activations: str = "f32"):
        """backend: "numba" (default), "numpy" (the reference) or "cuda".
        quant: "auto" computes on the file's own quantized blocks (float32 on the numpy backend,
        whose reference path dequantizes); "f32", "q8_0", "q4_0", "q4_1" convert at load.
        activations: "f32" (default: the exact function of the weights) or "int8" (numba only:
        the matmuls on quantized weights round x to int8 per 32-block, llama.cpp's scheme —
        faster, ~1% error; needs AVX-512 VNNI)."""
        ops = get_ops(backend, threads, activations)  # validate before the (slow) load
        path = model if model is not None else fetch.ensure_default_model(quiet=quiet)
        self.path = path
        if quant == "auto" and backend == "numpy":
            quant = "f32"
        self.quant = quant
        self.config, self.weights, self.tokenizer = load(path, quant)
        self.activations = activations
        if activations == "int8" and not self.weights.has_quantized():
            raise InvalidArgumentError("int8 activations need quantized weights (--quant auto on a "
                                       "GGUF with quantized blocks, or q8_0, q4_0, q4_1)")
        scales_for_kernels(self.weights, backend, activations)   # float16 where kernels widen them
        self.backend = backend
        make_model = getattr(ops, "make_model", None)  # the cuda backend runs whole steps itself
        self.model = (make_model(self.config, self.weights) if make_model
                      else Transformer(self.config, self.weights, ops))
        self.engine = Engine(self.model, self.tokenizer.stop_ids, max_context, block_size)

    # --- prompts -------------------------------------------------------------------------------
    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        try:
            return [int(i) for i in prompt]
        except (TypeError, ValueError):
            raise InvalidArgumentError("a prompt is a string or a list of token ids") from None

    def _stop_check(self, params: SamplingParams):
        if not params.stop:
            return None

        def check(seq: Sequence) -> bool:
            # only the tail can contain a new match: decode the last few tokens, not all
            tail = self.tokenizer.decode(seq.output_ids[-8:])
            return any(s in tail for s in params.stop)
        return check

    def _finish(self, seq: Sequence) -> Completion:
        text = self.tokenizer.decode(seq.output_ids)
        if seq.params.stop:
            cut = [text.find(s) for s in seq.params.stop if s in text]
            if cut:
                text = text[:min(cut)]
        return Completion(text, list(seq.output_ids), list(seq.prompt_ids), seq.finish_reason)

    # --- generation ----------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | None = None,
                 reuse_prefix: bool = False) -> list[Completion]:
        """One completion per prompt. A prompt is a string (used as is, no chat template) or a list
        of token ids. Several prompts run together as one batch. reuse_prefix (one prompt): see
        stream()."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        ids = [self._ids(p) for p in prompts]
        for _ in self.engine.run(ids, [params] * len(ids), self._stop_check(params), reuse_prefix):
            pass
        return [self._finish(s) for s in self.engine.last_seqs]

    def chat(self, messages: list[dict], params: SamplingParams | None = None,
             reuse_prefix: bool = False) -> Completion:
        """OpenAI-style messages [{"role": "user", "content": "..."}] -> the assistant's answer.
        reuse_prefix: a conversation's next turn prefills only its new message (see stream())."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], params, reuse_prefix)[0]

    def stream(self, prompt, params: SamplingParams | None = None,
               reuse_prefix: bool = False) -> Iterator[str]:
        """Yield the completion's text piece by piece (never half a UTF-8 character).
        reuse_prefix: keep this prompt's and answer's K/V when done, and start from the kept ones
        of the call before (as many tokens as this prompt begins with): a chat's next turn
        prefills only its new message."""
        params = params or SamplingParams()
        dec = StreamDecoder(self.tokenizer)
        hold = max((len(s) for s in params.stop), default=1) - 1  # a stop string may be forming
        sent = 0
        run = self.engine.run([self._ids(prompt)], [params], self._stop_check(params), reuse_prefix)
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

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None,
                    reuse_prefix: bool = False) -> Iterator[str]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.stream(prompt, params, reuse_prefix)

    # --- raw model -----------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """float32 [len(token_ids), vocab]: the next-token logits at every position."""
        return self.engine.logits(self._ids(token_ids))

    @property
    def stats(self):
        return self.engine.stats
