"""What quantization costs in quality, measured: `python -m minfer bench --quality`.

For each weight format we run the model over a held-out English text (Alice in Wonderland,
chapter I, public domain, shipped in minfer/data/) in windows of `window` tokens and compare:

  perplexity   exp(mean negative log-likelihood of each next token): lower is better
  KL           mean KL(p_f32 || p_format) of the next-token distributions, in nats: 0 is identical
  top-1        how often the format's most likely next token is the float32 model's

float32 (the file dequantized) is the reference every format is compared against.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = Path(__file__).parent / "data" / "alice_ch1.txt"


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def evaluate(model, quants=("f32", "q8_0", "q4_1", "q4_0", "auto"), window: int = 512,
             max_tokens: int | None = None, backend: str = "numba",
             activations=("f32",)) -> list[dict]:
    """One row per (quant, activations); int8 activations apply to quantized weights only."""
    from .llm import LLM
    ref = LLM(model, backend=backend, quant="f32", quiet=True)
    ids = ref.tokenizer.encode(TEXT.read_text())[: max_tokens]
    configs = [(q, a) for q in quants for a in activations if a == "f32" or q != "f32"]
    blocks = {getattr(t, "type", "") for t in ref.weights.raw.values()} & {"Q4_0", "Q4_1", "Q8_0"}
    if ("auto", "int8") in configs and not blocks:
        configs.remove(("auto", "int8"))           # a float file: "auto" is float32 weights
    others = {(q, a): (ref if (q, a) == ("f32", "f32") else
                       LLM(model, backend=backend, quant=q, quiet=True, activations=a))
              for q, a in configs}
    stats = {k: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for k in configs}
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        x, y = chunk[:-1], np.asarray(chunk[1:])
        lp_ref = log_softmax(ref.logits(x))                                # [n, V]
        for key, llm in others.items():
            lp = lp_ref if llm is ref else log_softmax(llm.logits(x))
            s = stats[key]
            s["nll"] -= lp[np.arange(len(y)), y].sum()
            s["kl"] += (np.exp(lp_ref) * (lp_ref - lp)).sum()
            s["top1"] += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
            s["n"] += len(y)
    rows = []
    for (q, a), s in stats.items():
        rows.append({"quant": q, "activations": a, "tokens": s["n"], "perplexity": float(np.exp(s["nll"] / s["n"])),
                     "kl_vs_f32": float(s["kl"] / s["n"]), "top1_vs_f32": s["top1"] / s["n"],
                     "weights_mb": others[q, a].weights.nbytes() / 1e6})
    return rows


def print_table(rows: list[dict]) -> None:
    print("reference f32 = the model file's own weights, dequantized to float32 (for a quantized file\n"
          "such as SmolLM2's Q4_1 GGUF, 'auto' computes exactly that function; the others re-quantize it)")
    print(f"{'quant':<6} {'act':<4} {'tokens':>7} {'perplexity':>11} {'KL vs f32':>10} {'top-1 vs f32':>13} "
          f"{'weights MB':>11}")
    for r in rows:
        print(f"{r['quant']:<6} {r.get('activations', 'f32'):<4} {r['tokens']:>7} {r['perplexity']:>11.3f} {r['kl_vs_f32']:>10.5f} "
              f"{r['top1_vs_f32'] * 100:>12.1f}% {r['weights_mb']:>11.1f}")
