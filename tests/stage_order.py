"""The stage order of a step, recorded: which of model.py's stages ran, in which order.

model.py is the specification; the CPU step (cpu/model.py) and the GPU step (gpu/model.py) must
run its stages in its order. A recorder wraps the functions a step calls and writes down the
stages each one does, named by the weight it reads where it has one:

    embedding | per layer: attn_norm qkv rope kv_write attention wo ffn_norm gate_up down | norm lm_head

A fused call does several stages: the GPU's qkv kernel is attn_norm, qkv, rope and kv_write.
Used by test_structure.py (model.py, the CPU step) and cuda_cases.py (the GPU step).
"""
from types import SimpleNamespace

LAYER = ["attn_norm", "qkv", "rope", "kv_write", "attention", "wo", "ffn_norm", "gate_up", "down"]


def expected(n_layers: int, head: bool = True) -> list[str]:
    return ["embedding"] + LAYER * n_layers + (["norm", "lm_head"] if head else [])


def squeeze(trace: list[str]) -> list[str]:
    """RoPE is one stage done twice (on q and on k): consecutive repeats count once."""
    return [s for i, s in enumerate(trace) if i == 0 or s != trace[i - 1]]


def weight_names(weights) -> dict:
    """id(array) -> the stage that reads it (model.Weights, or the GPU model's device copies)."""
    names = {}
    for L in weights.layers:
        for attr, stage in (("attn_norm", "attn_norm"), ("ffn_norm", "ffn_norm"), ("wo", "wo"),
                            ("w_down", "down"), ("w_gate_up", "gate_up"), ("wqkv", "qkv")):
            if getattr(L, attr, None) is not None:
                names[id(getattr(L, attr))] = stage
    names[id(weights.norm)] = "norm"
    names[id(weights.lm_head)] = "lm_head"
    return names


def recording_ops(ops, weights, trace: list) -> SimpleNamespace:
    """A copy of the op table `ops` whose stage functions append their stages to `trace`."""
    names = weight_names(weights)
    stages = {
        "embedding": lambda a: ["embedding"],
        "rope_angles": lambda a: [],                     # the angles: an input of RoPE, no stage
        "rmsnorm": lambda a: [names[id(a[1])]],          # attn_norm, ffn_norm or norm
        "qkv": lambda a: ["qkv"],
        "rope": lambda a: ["rope"],
        "kv_write": lambda a: ["kv_write"],
        "attention": lambda a: ["attention"],
        "linear": lambda a: [names[id(a[1])]],           # wo or lm_head
        "swiglu": lambda a: ["gate_up", "down"],
    }

    def wrap(name, f):
        def op(*args, **kwargs):
            trace.extend(stages[name](args))
            return f(*args, **kwargs)
        return op
    return SimpleNamespace(**{k: wrap(k, v) if k in stages else v for k, v in vars(ops).items()})
