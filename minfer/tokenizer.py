"""Text <-> token ids, and the chat template.

SmolLM2 (like GPT-2) uses byte-level BPE: text is split into word-like pieces by a regular
expression, each piece's UTF-8 bytes are mapped to printable symbols, and learned merges join
symbols into vocabulary entries. We build a Hugging Face `tokenizers` object either from a
tokenizer.json (HF folders) or from the vocabulary and merges stored in a GGUF file's metadata.

Chat models expect a conversation rendered by the model's own Jinja template (ChatML for SmolLM2):

    <|im_start|>system\nYou are ...<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

Templates come from model files, so they are rendered in jinja2's sandbox, within bounds on time
and size (chat_template.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .chat_template import BoundedEnvironment, Refused, TemplateLimitError, check_messages
from .errors import ModelFormatError, UnsupportedModelError, InvalidArgumentError

# The GPT-2 pre-tokenizer split, and the variants llama.cpp names in `tokenizer.ggml.pre`.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
DIGITS_FIRST = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
# GGUF pre-tokenizer names whose text split is GPT-2's (llama.cpp's table); any other name
# splits text in its own way (qwen2, deepseek, tekken, ...) and is refused, not guessed
GPT2_LIKE = {"gpt2", "gpt-2", "default", "phi-2", "mpt", "olmo", "roberta-bpe", "jais"}

# ChatML, used when a model ships no template of its own.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama3", "llama-bpe"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level])
    split = pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated")
    if pre in DIGITS_FIRST:  # every digit is its own piece before the GPT-2 split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split, byte_level])
    return pre_tokenizers.Sequence([split, byte_level])


class Tokenizer:
    def __init__(self, hf: HFTokenizer, chat_template: str | None, stop_ids: set[int],
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = False):
        self.hf = hf
        self.chat_template = chat_template or CHATML
        self.has_own_template = bool(chat_template)   # (else ChatML, which few models know)
        self.stop_ids = stop_ids
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self._template = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    # --- text <-> ids ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in the text (e.g. "<|im_start|>") become their ids;
        a BOS token is prepended only when asked and when the model wants one."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:       # a lone surrogate: the tokenizer takes no such text
            raise InvalidArgumentError(f"the text is not valid Unicode: a lone surrogate "
                                       f"(U+{ord(text[e.start]):04X}) at character {e.start}") from None
        except AttributeError:
            raise InvalidArgumentError(f"the text to encode must be a string, not "
                                       f"{type(text).__name__}") from None
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        n = self.vocab_size
        try:
            ids = list(ids)
        except TypeError:
            ids = None
        if ids is None or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                  and 0 <= i < n for i in ids):
            raise InvalidArgumentError(f"token ids to decode must be whole numbers in 0..{n - 1}")
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    # --- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        messages = check_messages(messages)
        size = sum(len(m["content"]) + len(m["role"]) for m in messages)
        env = self._template
        try:
            if self._compiled is None:
                self._compiled = env.from_string(self.chat_template)
            with env.budget(size):
                return env.render_bounded(self._compiled, dict(
                    messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token=self._tok(self.bos_id), eos_token=self._tok(self.eos_id)))
        except Refused as e:          # the template's own raise_exception(): about the input
            raise InvalidArgumentError(f"the chat template refused the conversation: {e}") from None
        except TemplateLimitError as e:
            raise ModelFormatError(f"the model's chat template {e}; refusing to render it") from None
        except RecursionError:
            raise ModelFormatError("the model's chat template recursed too deeply") from None
        except MemoryError:
            raise ModelFormatError("the model's chat template asked for more memory than there "
                                   "is") from None
        except Exception as e:  # noqa: BLE001 (whatever a template trips is the template's fault)
            raise ModelFormatError(f"the model's chat template failed: {type(e).__name__}: {e}") from None

    def _tok(self, i):
        return "" if i is None else (self.id_to_token(i) or "")

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise ModelFormatError("GGUF metadata 'tokenizer.ggml.model' is missing: the file has "
                                   "no tokenizer")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"tokenizer type {_short(kind)} is not supported yet (minfer reads byte-level BPE, "
                f"'gpt2'; 'llama' is SentencePiece: Llama 2, TinyLlama, Mistral)")
        tokens = _str_list(meta.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFormatError("GGUF metadata 'tokenizer.ggml.tokens' is missing or empty")
        merges = [tuple(m.split(" ", 1))
                  for m in _str_list(meta.get("tokenizer.ggml.merges", []), "tokenizer.ggml.merges")]
        if merges and min(map(len, merges)) != 2:
            i = next(i for i, m in enumerate(merges) if len(m) != 2)
            raise ModelFormatError(f"GGUF metadata 'tokenizer.ggml.merges'[{i}] is {_short(merges[i][0])}; "
                                   f"a merge is two tokens and a space")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            seen = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise ModelFormatError(f"GGUF metadata 'tokenizer.ggml.tokens': token {_short(t)} "
                                           f"appears twice (ids {seen[t]} and {i}); the file is corrupt")
                seen[t] = i
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if (not isinstance(types, list) or len(types) != len(tokens)
                or not set(map(type, types)) <= {int}):
            raise ModelFormatError("GGUF metadata 'tokenizer.ggml.token_type' is not one whole number "
                                   "per token")
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        if not isinstance(pre, str):
            raise ModelFormatError(f"GGUF metadata 'tokenizer.ggml.pre' is {_short(pre)}; expected a name")
        if pre not in GPT2_LIKE | DIGITS_FIRST | {"llama3", "llama-bpe"}:
            raise UnsupportedModelError(
                f"pre-tokenizer {pre!r} (GGUF metadata 'tokenizer.ggml.pre') is not supported yet: "
                f"minfer splits text as gpt2, llama3 and smollm do")
        ids = {k: _token_id(meta.get(f"tokenizer.ggml.{k}_token_id"), len(tokens), f"tokenizer.ggml.{k}_token_id")
               for k in ("bos", "eos", "eot")}
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"GGUF metadata 'tokenizer.chat_template' is {_short(template)}, "
                                   f"not a template (text)")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        if type(add_bos) is not bool:
            raise ModelFormatError(f"GGUF metadata 'tokenizer.ggml.add_bos_token' is {_short(add_bos)}; "
                                   f"expected true or false")
        try:
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
            hf.pre_tokenizer = _pre_tokenizer(pre)
            hf.decoder = decoders.ByteLevel()
            # control (3) and user-defined (4) tokens are matched whole in the text, never split
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                   for t, ty in zip(tokens, types) if ty in (3, 4)])
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ModelFormatError(f"the GGUF's vocabulary and merges do not make a tokenizer ({e}); "
                                   f"the file is corrupt") from None
        bos, eos = ids["bos"], ids["eos"]
        stop = {i for i in (eos, ids["eot"]) if i is not None}
        stop |= {vocab[t] for t in END_OF_TURN[:-1] if t in vocab}
        return cls(hf, template, stop, bos, eos, add_bos=add_bos)

    @classmethod
    def from_hf_folder(cls, folder: Path, config=None) -> "Tokenizer":
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelFormatError(f"{folder} has no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ModelFormatError(f"{path} could not be read: {e}") from None
        tc = _json(folder / "tokenizer_config.json")
        gc = _json(folder / "generation_config.json")
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: chat_template is "
                                   f"{_short(template)}, not a template (text)")
        jinja = folder / "chat_template.jinja"    # where transformers saves it now; it wins
        if jinja.is_file():
            try:
                template = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                why = getattr(e, "strerror", None) or e
                raise ModelFormatError(f"{jinja} could not be read ({why})") from None
        n = hf.get_vocab_size(with_added_tokens=True)

        def tok_id(entry):
            if isinstance(entry, dict):
                entry = entry.get("content")
            return hf.token_to_id(entry) if isinstance(entry, str) else None

        eos = tok_id(tc.get("eos_token"))
        bos = tok_id(tc.get("bos_token"))
        stop = set()
        for src in (eos, gc.get("eos_token_id"), getattr(config, "eos_id", None)):
            for i in (src if isinstance(src, list) else [src]):
                if i is not None:
                    stop.add(_token_id(i, n, "eos_token_id (generation_config.json or config.json)"))
        stop |= {hf.token_to_id(t) for t in END_OF_TURN[:-1] if hf.token_to_id(t) is not None}
        eos = eos if eos is not None else getattr(config, "eos_id", None)
        add_bos = tc.get("add_bos_token")
        if add_bos is None:        # Llama 3's way: tokenizer.json's post-processor prepends it
            with_ = hf.encode("a", add_special_tokens=True).ids
            without = hf.encode("a", add_special_tokens=False).ids
            if len(with_) == len(without) + 1 and with_[1:] == without:
                add_bos, bos = True, with_[0]
        return cls(hf, template, stop, bos, eos, add_bos=add_bos is True)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _str_list(v, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list) or (v and set(map(type, v)) != {str}):
        raise ModelFormatError(f"GGUF metadata '{where}' is not a list of strings")
    return v


def _token_id(v, n: int, where: str):
    if v is None:
        return None
    if type(v) is not int or not 0 <= v < n:
        raise ModelFormatError(f"{where} is {_short(v)}; it must be a token id (0 to {n - 1})")
    return v


def _json(path: Path) -> dict:
    try:
        v = json.loads(path.read_bytes()) if path.exists() else {}
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise ModelFormatError(f"{path} could not be read ({e.strerror or e})") from None
    if not isinstance(v, dict):
        raise ModelFormatError(f"{path} holds a JSON {type(v).__name__}, not an object")
    return v


class StreamDecoder:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    One emoji can span several byte-level tokens; until its last byte arrives the decoded text ends
    in U+FFFD, so we hold it back and emit it whole once it is complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        delta, self.text = text[len(self.text):], text
        return delta
