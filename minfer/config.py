"""ModelConfig: the hyper-parameters of a Llama-family model.

Two sources fill it: the metadata of a GGUF file (`llama.*` keys) and the `config.json` of a
Hugging Face checkpoint folder. Everything downstream reads only this dataclass.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, asdict

from .errors import UnsupportedModelError, ModelFormatError

# Architectures that are the plain Llama block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
SUPPORTED_GGUF_ARCHS = {"llama"}
SUPPORTED_HF_ARCHS = {"LlamaForCausalLM"}


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int                 # width of the residual stream (hidden_size, embedding_length)
    n_layers: int
    n_heads: int             # query heads
    n_kv_heads: int          # key/value heads (< n_heads: grouped-query attention)
    head_dim: int
    ffn_dim: int             # hidden width of the SwiGLU MLP
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # context length the model was trained for
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix
    bos_id: int | None = None
    eos_id: int | None = None
    name: str = "model"

    def __post_init__(self):
        # every field type- and range-checked: a bad value must fail here, in words, not as a
        # ZeroDivisionError (or silently wrong numbers) inside a kernel
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                  "max_seq_len"):
            v = getattr(self, f)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                v = int(v)
                setattr(self, f, v)
            if type(v) is not int or v < 1:
                raise ModelFormatError(f"model config: {f} is {v!r}; it must be a whole number >= 1")
        for f in ("rms_eps", "rope_theta"):
            v = getattr(self, f)
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                v = float(v)
                setattr(self, f, v)
            if type(v) is not float or not math.isfinite(v) or v <= 0:
                raise ModelFormatError(f"model config: {f} is {v!r}; it must be a finite number > 0")
        for f in ("bos_id", "eos_id"):
            v = getattr(self, f)
            if v is not None and (type(v) is not int or not 0 <= v < self.vocab_size):
                raise ModelFormatError(f"model config: {f} is {v!r}; it must be a token id "
                                       f"(0 to {self.vocab_size - 1})")
        if self.rms_eps >= 1:       # ~1e-6..1e-5 in practice; >= 1 would swamp every norm
            raise ModelFormatError(f"model config: rms_eps is {self.rms_eps!r}; it must be < 1")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_gguf(cls, meta: dict, n_vocab: int | None = None) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in SUPPORTED_GGUF_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}: minfer runs the Llama family "
                f"({', '.join(sorted(SUPPORTED_GGUF_ARCHS))})")

        def get(key, kind, default=None):
            v = meta.get(f"{arch}.{key}", default)
            if v is None:
                raise ModelFormatError(f"GGUF metadata lacks '{arch}.{key}'; the file is incomplete")
            return kind(v, f"GGUF metadata '{arch}.{key}'")

        _refuse_gguf_extras(meta, arch)
        dim = get("embedding_length", _int)
        n_heads = get("attention.head_count", _int)
        if n_heads < 1:
            raise ModelFormatError(f"GGUF metadata '{arch}.attention.head_count' is {n_heads}; it must be >= 1")
        head_dim = get("attention.key_length", _int, dim // n_heads)
        if get("attention.value_length", _int, head_dim) != head_dim:
            raise UnsupportedModelError("GGUF metadata gives attention.value_length != key_length; "
                                        "minfer runs models whose K and V heads have one width")
        rope_dims = get("rope.dimension_count", _int, head_dim)
        if rope_dims != head_dim:
            raise UnsupportedModelError(
                f"GGUF metadata '{arch}.rope.dimension_count' is {rope_dims} but the heads are "
                f"{head_dim} wide; partial rotary embeddings are not supported")
        vocab = meta.get(f"{arch}.vocab_size") or n_vocab
        if vocab is None:
            raise ModelFormatError("GGUF metadata gives no vocabulary size")
        name = meta.get("general.name", "model")
        return cls(
            vocab_size=_int(vocab, f"GGUF metadata '{arch}.vocab_size'"),
            dim=dim,
            n_layers=get("block_count", _int),
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", _int, n_heads),
            head_dim=head_dim,
            ffn_dim=get("feed_forward_length", _int),
            rms_eps=get("attention.layer_norm_rms_epsilon", _float, 1e-5),
            rope_theta=get("rope.freq_base", _float, 10000.0),
            max_seq_len=get("context_length", _int, 2048),
            tie_embeddings=True,  # the loader sets False when an `output.weight` exists
            bos_id=_id_or_none(meta.get("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id"),
            eos_id=_id_or_none(meta.get("tokenizer.ggml.eos_token_id"), "tokenizer.ggml.eos_token_id"),
            name=name if isinstance(name, str) else "model",
        )

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ModelFormatError(f"config.json holds a JSON {type(cfg).__name__}, not an object")
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        if not isinstance(archs, list) or not archs:
            archs = [archs]
        if not ({a for a in archs if isinstance(a, str)} & SUPPORTED_HF_ARCHS
                or cfg.get("model_type") == "llama"):
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r}: minfer runs LlamaForCausalLM checkpoints")
        _refuse_hf_extras(cfg)

        def need(key):
            if cfg.get(key) is None:
                raise ModelFormatError(f"config.json lacks {key!r}")
            return cfg[key]

        where = lambda key: f"config.json {key!r}"  # noqa: E731
        dim = _int(need("hidden_size"), where("hidden_size"))
        n_heads = _int(need("num_attention_heads"), where("num_attention_heads"))
        if n_heads < 1:
            raise ModelFormatError(f"config.json 'num_attention_heads' is {n_heads}; it must be >= 1")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        kv = cfg.get("num_key_value_heads")
        hd = cfg.get("head_dim")
        name = cfg.get("_name_or_path", "model")
        return cls(
            vocab_size=_int(need("vocab_size"), where("vocab_size")),
            dim=dim,
            n_layers=_int(need("num_hidden_layers"), where("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=n_heads if kv is None else _int(kv, where("num_key_value_heads")),
            head_dim=dim // n_heads if hd is None else _int(hd, where("head_dim")),
            ffn_dim=_int(need("intermediate_size"), where("intermediate_size")),
            rms_eps=_float(cfg.get("rms_norm_eps", 1e-6), where("rms_norm_eps")),   # LlamaConfig's
            rope_theta=_hf_rope_theta(cfg),
            max_seq_len=_int(cfg.get("max_position_embeddings", 2048), where("max_position_embeddings")),
            tie_embeddings=_bool(cfg.get("tie_word_embeddings", False), where("tie_word_embeddings")),
            bos_id=_id_or_none(cfg.get("bos_token_id"), where("bos_token_id")),
            eos_id=_id_or_none(eos, where("eos_token_id")),
            name=name if isinstance(name, str) and name else "model",
        )


# Sampling the model's authors recommend (its model card), by a name its files carry; `chat` uses
# it for any of these flags the user leaves unset. Others get FALLBACK_SAMPLING.
RECOMMENDED_SAMPLING = {"smollm2": {"temperature": 0.2, "top_p": 0.9}}
FALLBACK_SAMPLING = {"temperature": 0.7, "top_p": 1.0}


def recommended_sampling(config: "ModelConfig | None") -> dict:
    name = (config.name if config is not None else "").lower()
    for key, rec in RECOMMENDED_SAMPLING.items():
        if key in name:
            return dict(rec)
    return dict(FALLBACK_SAMPLING)


def readable_name(meta: dict, path) -> str:
    """A name for people: the file's own name where it names the model (SmolLM2-135M-Instruct),
    else the GGUF's basename, size label and finetune ("smollm2 135M instruct"), else
    general.name, else the file name."""
    import re
    from pathlib import Path
    stem = re.sub(r"\.gguf$", "", Path(path).name, flags=re.I)
    stem = re.sub(r"[.-](b?f16|f32|i?q\d\w*)$", "", stem, flags=re.I)    # the quant tag
    base = str(meta.get("general.basename") or "").strip()
    if base and base.lower().replace("-", "") in stem.lower().replace("-", ""):
        return stem
    if base:
        parts = [base, meta.get("general.size_label"), meta.get("general.finetune")]
        return " ".join(str(p) for p in parts if p)
    return str(meta.get("general.name") or stem)


# --- checks on raw values -------------------------------------------------------------------------

def _int(v, where: str) -> int:
    """A whole number: an int, or a float with no fraction (some exporters write 2048.0)."""
    if type(v) is float and math.isfinite(v) and v.is_integer():
        v = int(v)
    if type(v) is not int:
        raise ModelFormatError(f"{where} is {_show(v)}; it must be a whole number")
    return v


def _float(v, where: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise ModelFormatError(f"{where} is {_show(v)}; it must be a finite number")
    if v <= 0:
        raise ModelFormatError(f"{where} is {v}; it must be > 0")
    return float(v)


def _bool(v, where: str) -> bool:
    if type(v) is not bool:
        raise ModelFormatError(f"{where} is {_show(v)}; it must be true or false")
    return v


def _id_or_none(v, where: str):
    return None if v is None else _int(v, where)


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# --- settings that change what the model computes --------------------------------------------------
#
# A key minfer does not implement must stop the load: skipping it gives a model that runs and
# answers with wrong numbers. Each entry: the key, and the test that its value is the neutral one
# (the plain Llama block).

def _off(v) -> bool:
    return v is None or v is False or v == 0 or v == [] or v == {}


_HF_NEUTRAL = {
    "attention_bias": _off,
    "mlp_bias": _off,
    "sliding_window": _off,
    "use_sliding_window": _off,
    "attn_logit_softcapping": _off,
    "final_logit_softcapping": _off,
    "no_rope_layers": _off,
    "qk_layernorm": _off,
    "use_qk_norm": _off,
    "num_local_experts": _off,
    "num_experts": _off,
    "embedding_multiplier": lambda v: v in (None, 1, 1.0),
    "logits_scaling": lambda v: v in (None, 1, 1.0),
    "residual_multiplier": lambda v: v in (None, 1, 1.0),
    "attention_multiplier": lambda v: v is None,
    "partial_rotary_factor": lambda v: v in (None, 1, 1.0),
    "hidden_act": lambda v: v in (None, "silu", "swish"),
    "layer_types": lambda v: v is None or (isinstance(v, list)
                                           and all(t == "full_attention" for t in v)),
}


def _refuse_hf_extras(cfg: dict) -> None:
    for key, neutral in _HF_NEUTRAL.items():
        if key in cfg and not neutral(cfg[key]):
            raise UnsupportedModelError(
                f"config.json sets {key} = {_show(cfg[key])}, which minfer does not implement; "
                f"refusing to load a model it would run wrongly")


def _rope_type(d: dict, where: str) -> str:
    kind = d.get("rope_type", d.get("type", "default"))
    if kind is None:
        kind = "default"
    if kind != "default":
        raise UnsupportedModelError(
            f"{where} asks for RoPE type {_show(kind)}; minfer implements only the default RoPE "
            f"(no scaling), so it refuses to run this model with wrong positions")
    return kind


def _hf_rope_theta(cfg: dict) -> float:
    """rope_theta: at the top level (transformers 4) or in `rope_parameters` (transformers 5,
    with `rope_type`). A `rope_scaling` other than none/default is refused, never ignored."""
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ModelFormatError(f"config.json 'rope_scaling' is {_show(scaling)}; expected an object")
        _rope_type(scaling, "config.json 'rope_scaling'")
    top = cfg.get("rope_theta")
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ModelFormatError(f"config.json 'rope_parameters' is {_show(params)}; expected an object")
        if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
            raise UnsupportedModelError(
                "config.json gives RoPE parameters per layer type (rope_parameters: "
                f"{_show(sorted(params))}); minfer runs one RoPE for every layer")
        _rope_type(params, "config.json 'rope_parameters'")
        extra = set(params) - {"rope_type", "type", "rope_theta"}
        if extra:
            raise UnsupportedModelError(
                f"config.json 'rope_parameters' sets {', '.join(sorted(extra))}, which minfer does "
                f"not implement")
        inner = params.get("rope_theta")
        if inner is not None:
            theta = _float(inner, "config.json 'rope_parameters.rope_theta'")
            if top is not None and _float(top, "config.json 'rope_theta'") != theta:
                raise ModelFormatError(
                    f"config.json gives rope_theta {top} and rope_parameters.rope_theta {inner}; "
                    f"which one is meant is unclear")
            return theta
    return _float(10000.0 if top is None else top, "config.json 'rope_theta'")


def _refuse_gguf_extras(meta: dict, arch: str) -> None:
    def have(key, neutral):
        v = meta.get(f"{arch}.{key}")
        if v is not None and not neutral(v):
            raise UnsupportedModelError(
                f"GGUF metadata '{arch}.{key}' is {_show(v)}, which minfer does not implement; "
                f"refusing to load a model it would run wrongly")
    have("rope.scaling.type", lambda v: v == "none"
         or meta.get(f"{arch}.rope.scaling.factor") in (None, 0, 0.0, 1, 1.0))
    have("rope.scaling.factor", lambda v: v in (1, 1.0, 0, 0.0))
    have("expert_count", _off)
    have("attention.sliding_window", _off)
    have("attention.logit_softcapping", _off)
    have("final_logit_softcapping", _off)
