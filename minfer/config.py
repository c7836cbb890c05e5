"""ModelConfig: the hyper-parameters of a Llama-family model.

Two sources fill it: the metadata of a GGUF file (`llama.*` keys) and the `config.json` of a
Hugging Face checkpoint folder. Everything downstream reads only this dataclass.
"""
from __future__ import annotations

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
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}: minfer runs the Llama family "
                f"({', '.join(sorted(SUPPORTED_GGUF_ARCHS))})")

        def get(key, default=None):
            v = meta.get(f"{arch}.{key}", default)
            if v is None:
                raise ModelFormatError(f"GGUF metadata lacks '{arch}.{key}'; the file is incomplete")
            return v

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length", dim // n_heads))
        vocab = meta.get(f"{arch}.vocab_size") or n_vocab
        if vocab is None:
            raise ModelFormatError("GGUF metadata gives no vocabulary size")
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_seq_len=int(get("context_length", 2048)),
            tie_embeddings=True,  # the loader sets False when an `output.weight` exists
            bos_id=_int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
            eos_id=_int_or_none(meta.get("tokenizer.ggml.eos_token_id")),
            name=str(meta.get("general.name", "model")),
        )

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        if not (set(archs) & SUPPORTED_HF_ARCHS or cfg.get("model_type") == "llama"):
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r}: minfer runs LlamaForCausalLM checkpoints")
        if cfg.get("rope_scaling"):
            raise UnsupportedModelError("RoPE scaling (rope_scaling in config.json) is not supported yet")
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                dim=dim,
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or dim // n_heads),
                ffn_dim=int(cfg["intermediate_size"]),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_id=_int_or_none(cfg.get("bos_token_id")),
                eos_id=_int_or_none(eos[0] if isinstance(eos, list) else eos),
                name=str(cfg.get("_name_or_path", "model")),
            )
        except KeyError as e:
            raise ModelFormatError(f"config.json lacks {e.args[0]!r}") from None


def _int_or_none(v):
    return None if v is None else int(v)


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
