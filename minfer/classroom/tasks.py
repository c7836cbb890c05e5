"""The tasks of each lesson and their checks: each check calls the student's function on
random inputs of several shapes, compares with minfer's reference, and raises CheckFailed with
what differs (naming the classic mistakes when the output matches one of them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..batch import make_batch
from ..errors import MinferError
from .stubs import STUBS, _HEADER


class ExerciseError(MinferError):
    """A lesson number, folder or exercise file that the classroom cannot use."""


class CheckFailed(AssertionError):
    """A task's output differs from the reference; the message says how."""


# =============================================================================================
# Comparing a student's answer with the reference
# =============================================================================================

def _close(got, want, atol: float, rtol: float) -> bool:
    got = np.asarray(got)
    return got.shape == want.shape and bool(np.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True))


def expect_close(got, want, what: str, atol: float = 1e-5, rtol: float = 1e-4,
                 variants: list[tuple[str, np.ndarray]] = ()) -> None:
    """Raise CheckFailed unless `got` matches `want`. `variants` are (message, output of a known
    mistake): when the student's answer matches one, its message becomes the hint."""
    want = np.asarray(want)
    if got is None:
        raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
    try:
        got = np.asarray(got)
    except Exception:
        raise CheckFailed(f"{what}: the result is a {type(got).__name__}, not an array") from None
    if got.shape != want.shape:
        raise CheckFailed(f"{what}: shape {got.shape}, expected {want.shape}")
    if _close(got, want, atol, rtol):
        return
    for message, out in variants:
        if _close(got, out, atol, rtol):
            raise CheckFailed(f"{what}: {message}")
    both = np.isfinite(got) & np.isfinite(want)
    if not np.array_equal(np.isfinite(got), np.isfinite(want)):
        i = np.unravel_index(np.argmax(np.isfinite(got) != np.isfinite(want)), want.shape)
        raise CheckFailed(f"{what}: at index {tuple(int(j) for j in i)} you have {got[i]}, "
                          f"expected {want[i]}")
    err = np.where(both, np.abs(got.astype(np.float64) - want), 0)
    i = np.unravel_index(np.argmax(err), want.shape)
    raise CheckFailed(f"{what}: max |difference| {err[i]:.3g} at index {tuple(int(j) for j in i)} "
                      f"(yours {got[i]:.6g}, expected {want[i]:.6g})")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randn(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# =============================================================================================
# The tasks, lesson by lesson. Each check calls the student's function `f` and raises CheckFailed.
# =============================================================================================

@dataclass
class Task:
    name: str
    check: Callable[[Callable], None]
    hint: str
    op: str | None = None          # the op-table entry it can replace (see student_ops)


@dataclass
class Lesson:
    number: int
    slug: str
    title: str
    tasks: list[Task]
    stub: str
    minutes: int = 30
    references: dict = field(default_factory=dict)
    needs_cuda: bool = False       # its checks launch GPU kernels (a GPU, or numba's simulator)

    @property
    def filename(self) -> str:
        return f"lesson{self.number:02d}_{self.slug}.py"


# --- lesson 03: embedding and RMSNorm -----------------------------------------------------------

def _check_embedding(f):
    from ..stages.embedding import embedding
    rng = _rng(3)
    for V, D, T, dtype in [(37, 24, 1, np.float32), (101, 33, 7, np.float32), (50, 16, 5, np.float16)]:
        table = _randn(rng, V, D).astype(dtype)
        ids = rng.integers(0, V, size=T)
        ids[-1] = ids[0]                                            # a repeated token
        got = f(ids, table)
        expect_close(got, embedding(ids, table), f"T={T}, V={V}, D={D}, table {np.dtype(dtype).name}",
                     atol=0, rtol=0)
        if np.asarray(got).dtype != np.float32:
            raise CheckFailed(f"the result's dtype is {np.asarray(got).dtype}; the residual stream "
                              f"is float32 (a float16 table must be widened)")


def _rmsnorm_variants(x, w, eps):
    """The classic RMSNorm mistakes, as (message, what they output)."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return [
        ("you subtracted the mean (that is LayerNorm); RMSNorm divides by the root of the mean "
         "square, no centring", (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w),
        ("the gain w is missing: multiply by w at the end", x / np.sqrt(ms + eps)),
        ("eps belongs inside the square root: sqrt(mean(x^2) + eps)", x / (np.sqrt(ms) + eps) * w),
        ("the mean goes over the last axis (each token's own vector), with keepdims",
         x / np.sqrt(np.mean(x * x, axis=0, keepdims=True) + eps) * w),
    ]


def _check_rmsnorm(f):
    from ..stages.rmsnorm import rmsnorm
    rng = _rng(4)
    for T, D, scale, eps in [(1, 8, 1.0, 1e-5), (5, 33, 30.0, 1e-6), (3, 576, 1e-3, 1e-5)]:
        x, w = _randn(rng, T, D, scale=scale), _randn(rng, D) + 1
        xc = x.copy()
        got = f(x, w, eps)
        if not np.array_equal(x, xc):           # (before comparing: the reference reads x too)
            raise CheckFailed("your rmsnorm changed its input x in place; return a new array")
        expect_close(got, rmsnorm(x, w, eps), f"x [{T}, {D}] (scale {scale}), eps={eps}",
                     atol=1e-5, rtol=1e-4, variants=_rmsnorm_variants(x, w, eps))
        _expect_float32(got, f"x [{T}, {D}]")


# --- lesson 04: RoPE ----------------------------------------------------------------------------

def _check_rope_angles(f):
    from ..stages.rope import rope_angles
    for pos, hd, base in [([0, 1, 2, 3], 8, 10000.0), ([7, 100, 3000], 64, 100000.0),
                          ([5, 0, 17, 2, 9], 6, 500.0), ([0, 1, 4095, 8191], 64, 100000.0)]:
        pos = np.asarray(pos)
        got = f(pos, hd, base)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed("rope_angles returns a pair (cos, sin)")
        want = rope_angles(pos, hd, base)
        inv = base ** (-np.arange(0, hd, 2) / hd)
        ang = pos[:, None] * inv[None]
        bad_freq = pos[:, None] * (base ** (-np.arange(hd // 2) / hd))[None]
        ang32 = pos.astype(np.float32)[:, None] * inv.astype(np.float32)[None]    # all float32
        for k, name in enumerate(("cos", "sin")):
            fn = np.cos if k == 0 else np.sin
            what = f"{name} for positions {pos.tolist()}, head_dim={hd}, base={base}"
            expect_close(got[k], want[k], what, atol=2e-6, rtol=1e-5, variants=[
                ("theta_i = base^(-2i/head_dim) for i = 0 .. head_dim/2 - 1: the exponent "
                 "steps by 2/head_dim, not 1/head_dim", fn(bad_freq)),
                (f"{name} and {'sin' if k == 0 else 'cos'} are swapped",
                 (np.sin if k == 0 else np.cos)(ang)),
                ("the angles were computed in float32: an angle of ~8191 radians keeps only "
                 "~5e-4 of precision there. Multiply positions by frequencies in float64 "
                 "(positions.astype(np.float64)), then cast cos and sin to float32", fn(ang32)),
            ])
            _expect_float32(got[k], what)


def _rotate_half_rope(x, cos, sin):
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def _check_rope(f):
    from ..stages.rope import rope, rope_angles
    rng = _rng(5)
    for T, H, hd in [(1, 1, 4), (5, 3, 16), (4, 9, 64)]:
        x = _randn(rng, T, H, hd)
        pos = rng.integers(0, 500, size=T)
        cos, sin = rope_angles(pos, hd, 10000.0)
        xc = x.copy()
        x0, x1 = x[..., 0::2], x[..., 1::2]
        wrong_sign = np.empty_like(x)
        wrong_sign[..., 0::2] = x0 * cos[:, None] + x1 * sin[:, None]
        wrong_sign[..., 1::2] = -x0 * sin[:, None] + x1 * cos[:, None]
        got = f(x, cos, sin)
        if not np.array_equal(x, xc):           # (before comparing: the reference reads x too)
            raise CheckFailed("your rope changed its input x in place; write into a new array")
        expect_close(got, rope(x, cos, sin), f"x [{T}, {H}, {hd}]", atol=1e-5, rtol=1e-4,
                     variants=[
                         ("you paired the halves (x_i, x_{i+hd/2}), Hugging Face's rotate_half; "
                          "minfer pairs neighbours (x_2i, x_2i+1)", _rotate_half_rope(x, cos, sin)),
                         ("you rotated by -angle: (a, b) -> (a cos - b sin, a sin + b cos)", wrong_sign),
                     ])
        _expect_float32(got, f"x [{T}, {H}, {hd}]")


# --- lesson 05: attention -----------------------------------------------------------------------

def _check_softmax(f):
    from ..stages.attention import softmax
    rng = _rng(6)
    cases = [(_randn(rng, 3, 7), -1), (_randn(rng, 4, 5) * 300, -1), (_randn(rng, 2, 3, 6), 0)]
    masked = _randn(rng, 3, 5)
    masked[:, 3:] = -np.inf                                         # masked positions
    cases.append((masked, -1))
    for s, axis in cases:
        with np.errstate(all="ignore"):
            got = f(s, axis=axis)
        if got is not None and not np.all(np.isfinite(np.asarray(got, dtype=np.float64))):
            raise CheckFailed(f"scores {list(s.shape)} with values up to {np.max(s[np.isfinite(s)]):.0f}: "
                              f"nan or inf in your result; exp overflows unless you subtract the max first")
        with np.errstate(all="ignore"):
            e = np.exp(s - np.max(s))
        expect_close(got, softmax(s, axis=axis), f"scores {list(s.shape)}, axis={axis}",
                     atol=1e-6, rtol=1e-4, variants=[
                         ("the probabilities must sum to 1 along `axis` (each row), not over the "
                          "whole array", e / e.sum()),
                     ])


def _attention_variant(q, k_cache, v_cache, batch, causal=True, scale=True, group_of=None,
                       offset=0, contiguous=False):
    """The reference with one mistake switched on (for diagnosing a student's output): no mask, no
    scale, the wrong kv head, a mask off by `offset`, the cache read as if contiguous."""
    T, Hq, hd = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    kv_head = group_of or (lambda h: h // group)
    out = np.zeros_like(q)
    for b in range(batch.n_seqs):
        S = int(batch.context_lens[b])
        blocks = np.arange(-(-S // bs)) if contiguous else batch.block_tables[b, : -(-S // bs)]
        K = k_cache[blocks].reshape(-1, Hkv, hd)[:S]
        V = v_cache[blocks].reshape(-1, Hkv, hd)[:S]
        for t in range(batch.seq_starts[b], batch.seq_starts[b + 1]):
            for h in range(Hq):
                s = K[:, kv_head(h)] @ q[t, h] / (np.sqrt(hd) if scale else 1.0)
                if causal:
                    s = np.where(np.arange(S) <= batch.positions[t] + offset, s, -np.inf)
                with np.errstate(invalid="ignore"):
                    p = np.exp(s - s.max())
                    out[t, h] = (p / p.sum()) @ V[:, kv_head(h)]
    return out


def _attention_case(rng, Hq, Hkv, hd, bs, seqs, n_blocks):
    """seqs: (number of new tokens, position of the first) per sequence. Blocks are handed out
    shuffled; the whole pool is random, and the slots past each context hold huge values."""
    order = list(rng.permutation(n_blocks))
    entries = []
    for n, start in seqs:
        need = -(-(start + n) // bs)
        entries.append((np.zeros(n, dtype=np.int64), start, [int(order.pop()) for _ in range(need)]))
    batch = make_batch(entries, bs)
    k_cache, v_cache = _randn(rng, n_blocks, bs, Hkv, hd), _randn(rng, n_blocks, bs, Hkv, hd)
    for b, (_, _, table) in enumerate(entries):
        last, used = table[-1], int(batch.context_lens[b]) - (len(table) - 1) * bs
        k_cache[last, used:] = 1e4                                  # beyond the context: never read
        v_cache[last, used:] = 1e4
    return _randn(rng, len(batch.token_ids), Hq, hd), k_cache, v_cache, batch


def _check_paged_attention(f):
    from ..stages.attention import paged_attention
    rng = _rng(7)
    cases = [
        ("one sequence, a 5-token prompt, one block, 2 heads", (2, 2, 8, 16, [(5, 0)], 2)),
        ("one sequence decoding at position 6, GQA 4 query / 2 kv heads", (4, 2, 8, 4, [(1, 6)], 4)),
        ("three sequences (prefill 6, decode at 9, 3 tokens at 5..7), GQA 6/2, blocks of 4",
         (6, 2, 16, 4, [(6, 0), (1, 9), (3, 5)], 12)),
        ("SmolLM2's heads: 9 query / 3 kv, head_dim 64, two sequences",
         (9, 3, 64, 16, [(4, 0), (2, 20)], 6)),
    ]
    for what, (Hq, Hkv, hd, bs, seqs, nb) in cases:
        q, kc, vc, batch = _attention_case(rng, Hq, Hkv, hd, bs, seqs, nb)
        kc0, vc0 = kc.copy(), vc.copy()
        got = f(q, kc, vc, batch)
        group = Hq // Hkv
        variants = [
            ("the causal mask is missing: a query at position p sees only keys 0..p",
             _attention_variant(q, kc, vc, batch, causal=False)),
            ("the scores are not scaled: divide q.k by sqrt(head_dim)",
             _attention_variant(q, kc, vc, batch, scale=False)),
            ("the mask is off by one: a query at position p sees keys 0..p (j <= p), not p + 1",
             _attention_variant(q, kc, vc, batch, offset=1)),
            ("the mask hides the token itself: a query at position p sees keys 0..p, its own "
             "included (j <= p, not j < p); at position 0 it would see nothing, and softmax of "
             "nothing is NaN", _attention_variant(q, kc, vc, batch, offset=-1)),
            ("the block table is ignored: sequence b's keys are in blocks "
             "batch.block_tables[b], in that order, not in blocks 0, 1, 2, ...",
             _attention_variant(q, kc, vc, batch, contiguous=True)),
        ]
        if Hkv > 1 and group > 1:
            variants.append(("query head h reads kv head h // (Hq // Hkv) (consecutive query heads "
                             "share a kv head), not h % Hkv",
                             _attention_variant(q, kc, vc, batch, group_of=lambda h: h % Hkv)))
        expect_close(got, paged_attention(q, kc, vc, batch), what, atol=1e-4, rtol=1e-3,
                     variants=variants)
        _expect_float32(got, what)
        if not (np.array_equal(kc, kc0) and np.array_equal(vc, vc0)):
            raise CheckFailed(f"{what}: your attention wrote into the KV cache; it only reads it")


# --- lesson 06: the KV cache --------------------------------------------------------------------

def _ref_slot_mapping(block_table, start, stop, block_size):
    """Slots of positions start..stop-1 of a sequence, exactly as make_batch computes them."""
    return make_batch([(np.zeros(stop - start, dtype=np.int64), start, list(block_table))],
                      block_size).slot_mapping


def _check_slot_mapping(f):
    for table, start, stop, bs in [([0], 0, 5, 16), ([3, 0, 2], 0, 12, 4), ([7, 1, 4, 5], 9, 14, 4),
                                   ([2, 9], 15, 16, 16), ([6, 3, 8], 10, 11, 5)]:
        pos = np.arange(start, stop)
        expect_close(f(table, start, stop, bs), _ref_slot_mapping(table, start, stop, bs),
                     f"table {table}, positions {start}..{stop - 1}, block_size {bs}", atol=0, rtol=0,
                     variants=[
                         ("use the block table: the block of position p is table[p // block_size], "
                          "not p // block_size itself", pos),
                         ("slot = block * block_size + p % block_size",
                          np.asarray(table)[pos // bs] + pos % bs),
                     ])


def _check_kv_write(f):
    from ..stages.kvcache import kv_write
    rng = _rng(8)
    for nb, bs, Hkv, hd, slots in [(2, 4, 1, 4, [0, 1, 2]), (6, 4, 2, 8, [13, 14, 2, 22, 7]),
                                   (4, 16, 3, 64, [63])]:
        slots = np.asarray(slots, dtype=np.int64)
        k, v = _randn(rng, len(slots), Hkv, hd), _randn(rng, len(slots), Hkv, hd)
        kc, vc = _randn(rng, nb, bs, Hkv, hd), _randn(rng, nb, bs, Hkv, hd)
        kc_want, vc_want = kc.copy(), vc.copy()
        kv_write(kc_want, vc_want, k, v, slots)
        f(kc, vc, k, v, slots)                                      # writes in place; returns nothing
        what = f"pool [{nb} blocks x {bs}], slots {slots.tolist()}"
        expect_close(kc, kc_want, what + ", k_cache after the write", atol=0, rtol=0)
        expect_close(vc, vc_want, what + ", v_cache after the write", atol=0, rtol=0)


# --- lesson 07: the MLP -------------------------------------------------------------------------

def _check_silu(f):
    from ..stages.mlp import silu
    rng = _rng(9)
    for z in [_randn(rng, 7), _randn(rng, 3, 11, scale=6), np.array([-100.0, -20, 0, 20, 100], np.float32)]:
        try:
            with np.errstate(over="raise"):                 # the task: no overflow warnings
                got = f(z)
        except FloatingPointError:
            raise CheckFailed(f"z in [{z.min():.0f}, {z.max():.0f}]: a value overflowed (exp(-z) "
                              f"is inf in float32 from z < -88; NumPy warns at every call): "
                              f"write sigmoid with tanh, or exp of -|z| only") from None
        expect_close(got, silu(z), f"z {list(z.shape)} in [{z.min():.1f}, {z.max():.1f}]",
                     atol=1e-5, rtol=1e-4, variants=[
                         ("that is the sigmoid alone; silu(z) = z * sigmoid(z)", 1 / (1 + np.exp(-z.astype(np.float64)))),
                         ("that is ReLU; silu is smooth: z * sigmoid(z)", np.maximum(z, 0)),
                     ])
        _expect_float32(got, f"z {list(z.shape)}")


def _check_swiglu(f):
    from ..stages.mlp import silu, swiglu
    rng = _rng(10)
    for T, D, F in [(1, 8, 12), (5, 24, 40), (3, 64, 96)]:
        x = _randn(rng, T, D)
        wg, wu, wd = _randn(rng, F, D, scale=0.3), _randn(rng, F, D, scale=0.3), _randn(rng, D, F, scale=0.3)
        got = f(x, wg, wu, wd)
        _expect_float32(got, f"x [{T}, {D}], ffn {F}")
        expect_close(got, swiglu(x, wg, wu, wd), f"x [{T}, {D}], ffn {F}",
                     atol=1e-4, rtol=1e-3, variants=[
                         ("silu goes on the gate branch: silu(x W_gate^T) * (x W_up^T)",
                          (silu(x @ wu.T) * (x @ wg.T)) @ wd.T),
                     ])


# --- lesson 08: sampling ------------------------------------------------------------------------

def _check_repetition_penalty(f):
    from ..sampling import apply_repetition_penalty
    rng = _rng(11)
    for V, seen, penalty in [(10, [1, 3, 3, 7], 1.3), (50, [0, 49, 20, 21, 20], 2.0), (8, [2], 1.0),
                             (8, [], 1.5)]:
        logits = _randn(rng, V, scale=3)
        seen = np.asarray(seen, dtype=np.int64)
        before = logits.copy()
        want = apply_repetition_penalty(logits, seen, penalty)
        wrong = logits.copy()
        if len(seen):
            wrong[np.unique(seen)] /= penalty
        expect_close(f(logits, seen, penalty), want, f"{V} logits, seen {seen.tolist()}, penalty {penalty}",
                     atol=1e-6, rtol=1e-5, variants=[
                         ("dividing a negative logit makes it *larger*; multiply negative ones by "
                          "the penalty and divide positive ones", wrong),
                     ])
        if not np.array_equal(logits, before):
            raise CheckFailed("your function changed the caller's logits in place; work on a copy")


def _kept(x):
    return np.flatnonzero(np.isfinite(np.asarray(x, dtype=np.float64)))


def _check_filter_logits(f):
    from ..sampling import SamplingParams, filter_logits
    rng = _rng(12)
    for V in (12, 40):
        logits = _randn(rng, V, scale=2.5)
        for kw in [dict(top_k=5), dict(top_k=1), dict(top_p=0.9), dict(top_p=0.5), dict(top_p=0.999),
                   dict(min_p=0.1), dict(min_p=0.5), dict(top_k=8, top_p=0.8, min_p=0.05)]:
            p = SamplingParams(temperature=1.0, **kw)
            want = filter_logits(logits, p)
            got = f(logits.copy(), p)
            what = f"{V} logits, " + ", ".join(f"{k}={v}" for k, v in kw.items())
            if got is None:
                raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
            if not np.array_equal(_kept(got), _kept(want)):
                k_got, k_want = len(_kept(got)), len(_kept(want))
                more = ""
                if "top_p" in kw and abs(k_got - k_want) == 1:
                    more = (" — keep a token while the probability mass *before* it is below top_p "
                            "(so the token that crosses top_p is kept too)")
                raise CheckFailed(f"{what}: you keep {k_got} tokens, expected {k_want}{more}")
            expect_close(np.where(np.isfinite(got), got, 0), np.where(np.isfinite(want), want, 0),
                         what + " (the kept logits must keep their values)", atol=1e-6, rtol=1e-6)


def _check_sample(f):
    from ..sampling import SamplingParams, sample
    rng = _rng(13)
    logits = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0], dtype=np.float32)
    seen = np.array([3])
    greedy = SamplingParams(temperature=0)
    got = f(logits, greedy, _rng(0))
    if int(got) != sample(logits, greedy, _rng(0)):
        raise CheckFailed(f"temperature 0 is greedy: expected token {int(np.argmax(logits))}, got {got}")
    pen = SamplingParams(temperature=0, repetition_penalty=2.0)
    if int(f(logits, pen, _rng(0), seen)) != sample(logits, pen, _rng(0), seen):
        raise CheckFailed("greedy with repetition_penalty=2 and token 3 seen: the penalty applies "
                          "before the arg-max, so token 0 wins")
    p = SamplingParams(temperature=0.8, top_k=4)
    z = logits / 0.8
    keep = np.argsort(-z)[:4]
    probs = np.zeros(len(z))
    probs[keep] = np.exp(z[keep] - z[keep].max())
    probs /= probs.sum()
    n = 4000
    draws = np.array([int(f(logits, p, rng)) for _ in range(n)])
    if not np.isin(draws, keep).all():
        raise CheckFailed(f"with top_k=4 you drew token {draws[~np.isin(draws, keep)][0]}, which top-k removed")
    freq = np.bincount(draws, minlength=len(z)) / n
    worst = int(np.argmax(np.abs(freq - probs)))
    if abs(freq[worst] - probs[worst]) > 0.035:
        raise CheckFailed(f"temperature 0.8, top_k 4: token {worst} came {freq[worst]:.3f} of the time over "
                          f"{n} draws, expected {probs[worst]:.3f}; divide the logits by the temperature, "
                          f"filter, softmax, then draw with the rng you are given")


# --- lesson 09: Numba kernels -------------------------------------------------------------------

def _expect_compiled(f, name: str, *probe) -> None:
    """Fail unless f is a Numba kernel. An untouched stub (a plain function that raises
    NotImplementedError) is called on `probe` first, so that it reports as not done yet."""
    from numba.core.dispatcher import Dispatcher
    if not isinstance(f, Dispatcher):
        f(*probe)
        raise CheckFailed(f"{name} is a plain Python function, not a Numba kernel: decorate it "
                          f"with @njit (the stub has the decorator commented out, just above "
                          f"`def {name}`); the check insists it is compiled")


def _run_kernel(f, *args):
    """Call a student's kernel; a Numba compile error becomes a short CheckFailed."""
    from numba.core.errors import NumbaError
    try:
        return f(*args)
    except NumbaError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()][:6]
        raise CheckFailed("Numba could not compile your function:\n          "
                          + "\n          ".join(lines)) from None


def _expect_float32(got, what: str) -> None:
    dtype = np.asarray(got).dtype
    if dtype != np.float32:
        raise CheckFailed(f"{what}: the result is {dtype}, expected float32; allocate the output "
                          f"with dtype=np.float32 (np.zeros(shape) alone is float64)")


def _check_rmsnorm_numba(f):
    from ..stages.rmsnorm import rmsnorm
    rng = _rng(14)
    _expect_compiled(f, "rmsnorm_numba", _randn(rng, 2, 8), _randn(rng, 8), 1e-5)
    for T, D, scale, eps in [(1, 8, 1.0, 1e-5), (5, 33, 30.0, 1e-6), (3, 576, 1e-3, 1e-5), (2, 1, 2.0, 1e-5)]:
        x, w = _randn(rng, T, D, scale=scale), _randn(rng, D) + 1
        xc, wc = x.copy(), w.copy()
        what = f"x [{T}, {D}] (scale {scale}), eps={eps}"
        got = _run_kernel(f, x, w, eps)
        if not (np.array_equal(x, xc) and np.array_equal(w, wc)):
            raise CheckFailed("your kernel changed its input x or w in place; write into a new array")
        expect_close(got, rmsnorm(x, w, eps), what, atol=1e-5, rtol=1e-4,
                     variants=_rmsnorm_variants(x, w, eps))
        _expect_float32(got, what)


def _check_matmul_numba(f):
    rng = _rng(15)
    _expect_compiled(f, "matmul_numba", _randn(rng, 2, 8), _randn(rng, 3, 8))
    for T, K, O in [(1, 64, 48), (3, 33, 17), (1, 576, 200), (5, 40, 40), (9, 96, 31)]:
        x, w = _randn(rng, T, K), _randn(rng, O, K, scale=0.1)
        xc, wc = x.copy(), w.copy()
        what = f"x [{T}, {K}], w [{O}, {K}]"
        got = _run_kernel(f, x, w)
        want = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
        variants = [("only the first token is right: loop over every row t of x",
                     np.concatenate([want[:1], np.zeros_like(want[1:])]))] if T > 1 else []
        if K == O:
            variants.append(("w is stored [out, in]: out[t, o] = sum over k of x[t, k] * w[o, k] "
                             "(you computed x @ w, not x @ w.T)", x @ w))
        expect_close(got, want, what, atol=1e-4, rtol=1e-4, variants=variants)
        _expect_float32(got, what)
        if not (np.array_equal(x, xc) and np.array_equal(w, wc)):
            raise CheckFailed("your kernel changed x or w; it should only read them")


# --- lesson 10: quantized blocks ----------------------------------------------------------------

def _ref_quantize_q8_0(w):
    from ..stages.quant import quantize
    return quantize(w, "Q8_0")


def _ref_dequantize_q8_0(raw, shape):
    from ..stages.quant import dequantize
    return dequantize(raw, "Q8_0", shape)


def _ref_dequantize_q4_1(raw, shape):
    from ..stages.quant import dequantize
    return dequantize(raw, "Q4_1", shape)


def _q8_0_inputs(rng):
    """Weight arrays that exercise every corner of Q8_0 quantization."""
    ties = np.linspace(-0.5, 0.5, 32).astype(np.float32)
    ties[0] = 127 / 16                                   # d = 1/16 exactly...
    ties[1:6] = np.array([2.5, -3.5, 0.5, -0.5, 6.5], np.float32) / 16   # ...and exact halves
    zero = np.zeros(32, np.float32)                      # d = 0: no division by zero
    negative = _randn(rng, 32)
    negative[7] = -9.0                                   # the largest magnitude is negative
    return [
        ("one block with exact ties (w / d = 2.5, -3.5, 0.5 ...)", ties[None]),
        ("a block of zeros next to a normal one", np.stack([zero, _randn(rng, 32)])),
        ("a block whose largest weight is negative", negative[None]),
        ("w [3, 64] (scale 0.05)", _randn(rng, 3, 64, scale=0.05)),
        ("w [2, 5, 96] (a 3-d array; blocks along the last axis)", _randn(rng, 2, 5, 96, scale=3.0)),
    ]


def _as_bytes(got, fmt: str, shape_prefix, what: str) -> np.ndarray:
    from ..stages.quant import BLOCK_DTYPES
    if got is None:
        raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
    if isinstance(got, (bytes, bytearray)):
        got = np.frombuffer(got, dtype=np.uint8)
    got = np.asarray(got)
    if got.dtype == BLOCK_DTYPES[fmt]:                    # a structured array of blocks: fine too
        got = np.ascontiguousarray(got).view(np.uint8)
    if got.dtype != np.uint8:
        raise CheckFailed(f"{what}: the result is {got.dtype}; return the raw bytes, uint8 "
                          f"(a structured array .view(np.uint8) gives them)")
    return got.reshape(*shape_prefix, -1) if got.size % BLOCK_DTYPES[fmt].itemsize == 0 else got


def _compare_blocks(got: np.ndarray, want: np.ndarray, fmt: str, what: str, variants=()) -> None:
    """Raise CheckFailed unless the bytes are identical; say which block and field differ."""
    from ..stages.quant import BLOCK_DTYPES
    if got.shape != want.shape:
        raise CheckFailed(f"{what}: shape {got.shape}, expected {want.shape} "
                          f"({BLOCK_DTYPES[fmt].itemsize} bytes per block of 32)")
    if np.array_equal(got, want):
        return
    for message, out in variants:
        if np.array_equal(got, out):
            raise CheckFailed(f"{what}: {message}")
    g = np.ascontiguousarray(got).reshape(-1).view(BLOCK_DTYPES[fmt])
    e = np.ascontiguousarray(want).reshape(-1).view(BLOCK_DTYPES[fmt])
    i = int(np.flatnonzero(g != e)[0])
    if g[i]["d"].view(np.uint16) != e[i]["d"].view(np.uint16):
        raise CheckFailed(f"{what}: block {i}: d is {g[i]['d']}, expected {e[i]['d']} "
                          f"(stored as float16, little-endian, in the block's first 2 bytes)")
    j = int(np.flatnonzero(g[i]["qs"] != e[i]["qs"])[0])
    raise CheckFailed(f"{what}: block {i}: q[{j}] is {g[i]['qs'][j]}, expected {e[i]['qs'][j]}")


def _check_quantize_q8_0(f):
    from ..stages.quant import BLOCK_DTYPES, quantize
    rng = _rng(16)
    for what, w in _q8_0_inputs(rng):
        wc = w.copy()
        want = quantize(w, "Q8_0")
        got = _as_bytes(f(w), "Q8_0", w.shape[:-1], what)
        x = w.reshape(-1, 32)
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            inv16 = np.where(d == 0, np.float32(0), np.float32(1) / d.astype(np.float16).astype(np.float32))

        def blocks(q):
            out = np.zeros(len(x), BLOCK_DTYPES["Q8_0"])
            out["d"], out["qs"] = d[:, 0], q
            return out.view(np.uint8).reshape(want.shape)

        half_even = np.round(x * inv).astype(np.int8)
        via_f16 = np.sign(x * inv16) * np.floor(np.abs(x * inv16) + 0.5)
        variants = [
            ("np.round sends halves to the even neighbour (2.5 -> 2); llama.cpp's roundf sends "
             "them away from zero (2.5 -> 3, -3.5 -> -4)", blocks(half_even)),
            ("quantize with the float32 scale d = max|w| / 127; only the stored copy of d is "
             "rounded to float16", blocks(via_f16.astype(np.int8))),
        ]
        _compare_blocks(got, want, "Q8_0", what, variants)
        if not np.array_equal(w, wc):
            raise CheckFailed(f"{what}: your function changed w in place")


def _check_dequantize_q8_0(f):
    from ..stages.quant import BLOCK_DTYPES, dequantize, quantize
    rng = _rng(17)
    for shape, scale in [((1, 32), 1.0), ((4, 64), 0.05), ((3, 2, 96), 7.0)]:
        w = _randn(rng, *shape, scale=scale)
        raw = quantize(w, "Q8_0")
        rc = raw.copy()
        what = f"blocks of a {list(shape)} array"
        got = f(raw, shape)
        want = dequantize(raw, "Q8_0", shape)
        b = raw.reshape(-1).view(BLOCK_DTYPES["Q8_0"])
        unsigned = (b["d"].astype(np.float32)[:, None] * b["qs"].view(np.uint8).astype(np.float32)).reshape(shape)
        expect_close(got, want, what, atol=0, rtol=0, variants=[
            ("the quants are signed int8 (-127..127): read them with dtype int8, not uint8", unsigned),
            ("each weight is d * q: multiply by the block's scale",
             b["qs"].astype(np.float32).reshape(shape)),
        ])
        _expect_float32(got, what)
        if not np.array_equal(raw, rc):
            raise CheckFailed(f"{what}: your function changed the bytes it was given")


def _check_dequantize_q4_1(f):
    from ..stages.quant import BLOCK_DTYPES, dequantize, quantize
    rng = _rng(18)
    for shape, scale, shift in [((1, 32), 1.0, 0.0), ((4, 64), 0.05, 0.02), ((3, 2, 96), 3.0, -1.0)]:
        w = _randn(rng, *shape, scale=scale) + np.float32(shift)
        raw = quantize(w, "Q4_1")
        rc = raw.copy()
        what = f"blocks of a {list(shape)} array"
        got = f(raw, shape)
        want = dequantize(raw, "Q4_1", shape)
        b = raw.reshape(-1).view(BLOCK_DTYPES["Q4_1"])
        d, m = b["d"].astype(np.float32)[:, None], b["m"].astype(np.float32)[:, None]
        lo, hi = (b["qs"] & 0x0F).astype(np.float32), (b["qs"] >> 4).astype(np.float32)
        inter = np.stack([lo, hi], axis=-1).reshape(len(b), 32)            # q0 q16 q1 q17 ...
        swapped = np.concatenate([hi, lo], axis=1)
        straight = np.concatenate([lo, hi], axis=1)
        expect_close(got, want, what, atol=0, rtol=0, variants=[
            ("wrong nibble order: byte j holds weight j in its LOW nibble and weight j + 16 in its "
             "HIGH nibble (not two neighbours)", (d * inter + m).reshape(shape)),
            ("low and high nibbles swapped: the low nibble (byte & 0x0F) is weight j, the high "
             "nibble (byte >> 4) is weight j + 16", (d * swapped + m).reshape(shape)),
            ("the minimum m is missing: w = d * q + m", (d * straight).reshape(shape)),
            ("that is Q4_0's formula; Q4_1 is w = d * q + m, with m from bytes 2-3 of the block",
             (d * (straight - 8)).reshape(shape)),
            ("right up to the last bits: compute d * q + m in float32, as the reference does "
             "(float64 rounds differently)",
             (d.astype(np.float64) * straight + m).astype(np.float32).reshape(shape)),
        ])
        _expect_float32(got, what)
        if not np.array_equal(raw, rc):
            raise CheckFailed(f"{what}: your function changed the bytes it was given")


# --- lesson 11: a GPU kernel --------------------------------------------------------------------

def cuda_ready() -> bool:
    """Can numba.cuda launch kernels in this process: a GPU, or the simulator
    (NUMBA_ENABLE_CUDASIM=1 when numba was first imported)?"""
    from numba import config
    if config.ENABLE_CUDASIM:
        return True
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:                                      # numba-cuda missing or broken
        return False


def _expect_cuda_kernel(f, name: str, *probe) -> None:
    """Fail unless f is a numba.cuda kernel. An untouched stub (a plain function that raises
    NotImplementedError) is called on `probe` first, so that it reports as not done yet."""
    kind = type(f).__name__
    if "CUDA" in kind:                                     # CUDADispatcher, or the simulator's FakeCUDAKernel
        return
    try:
        f(*probe)
    except NotImplementedError:
        raise
    except Exception:                                      # cuda.threadIdx & co. exist only in a kernel
        pass
    if "Dispatcher" in kind:
        raise CheckFailed(f"{name} is a CPU kernel (@njit); a GPU kernel is decorated with @cuda.jit")
    raise CheckFailed(f"{name} is a plain Python function, not a GPU kernel: decorate it with "
                      f"@cuda.jit (the stub has the decorator commented out, just above `def {name}`)")


def _check_rmsnorm_kernel(f):
    from ..stages.rmsnorm import rmsnorm
    rng = _rng(19)
    x0, w0 = _randn(rng, 2, 8), _randn(rng, 8)
    _expect_cuda_kernel(f, "rmsnorm_kernel", x0, w0, np.float32(1e-5), np.empty_like(x0))
    if not cuda_ready():
        raise CheckFailed("numba.cuda cannot run kernels in this process (no GPU, and the simulator "
                          "is off): run `NUMBA_ENABLE_CUDASIM=1 python -m minfer lesson check 11` "
                          "(`python -m minfer lesson check 11` does this by itself)")
    from numba import cuda
    from numba.core.errors import NumbaError
    # (T rows = blocks, D columns, threads per block): D below, at and above the block size
    for T, D, threads, scale, eps in [(1, 8, 8, 1.0, 1e-5), (3, 33, 8, 30.0, 1e-6),
                                      (2, 5, 16, 1.0, 1e-5), (4, 70, 4, 1e-3, 1e-5)]:
        x, w = _randn(rng, T, D, scale=scale), _randn(rng, D) + 1
        xc, wc = x.copy(), w.copy()
        what = f"x [{T}, {D}] (scale {scale}), eps={eps}, launched [{T}, {threads}]"
        dx, dw = cuda.to_device(x), cuda.to_device(w)
        dout = cuda.to_device(np.full((T, D), np.nan, np.float32))    # unwritten stays nan
        try:
            f[T, threads](dx, dw, np.float32(eps), dout)
            cuda.synchronize()
        except NumbaError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()][:6]
            raise CheckFailed("numba.cuda could not compile your kernel:\n          "
                              + "\n          ".join(lines)) from None
        got = dout.copy_to_host()
        want = rmsnorm(x, w, eps)
        if np.isnan(got).any() and not np.isnan(want).any():
            cols = np.flatnonzero(np.isnan(got).any(axis=0))
            if cols.min() >= threads:
                raise CheckFailed(f"{what}: columns {threads} and up were never written; each "
                                  f"thread handles columns tid, tid + blockDim.x, ... "
                                  f"(range(tid, D, cuda.blockDim.x)), not only column tid")
            rows = np.flatnonzero(np.isnan(got).any(axis=1))
            raise CheckFailed(f"{what}: out[{rows[0]}, {cols[0]}] was never written (still nan); "
                              f"block t writes every column of row t = cuda.blockIdx.x")
        ms = np.mean(x * x, axis=-1, keepdims=True)
        expect_close(got, want, what, atol=1e-5, rtol=1e-4, variants=_rmsnorm_variants(x, w, eps) + [
            ("the mean of the squares divides the sum by D (x.shape[1]), not by the number of "
             "threads", x / np.sqrt(ms * D / threads + eps) * w),
            ("each thread sums only its own columns (tid, tid + blockDim.x, ...); summing all D "
             "in every thread and then adding the threads' sums counts each column blockDim.x times",
             x / np.sqrt(ms * threads + eps) * w),
            ("only thread 0's partial sum reached the total: the tree must add part[tid + s] into "
             "part[tid] for s = blockDim.x // 2, ..., 1, with cuda.syncthreads() after each step",
             x / np.sqrt((x[:, 0:D:threads] ** 2).sum(-1, keepdims=True) / D + eps) * w),
        ])
        if not (np.array_equal(dx.copy_to_host(), xc) and np.array_equal(dw.copy_to_host(), wc)):
            raise CheckFailed(f"{what}: your kernel changed x or w; write into out only")


# --- lesson 12: the prefix cache's block names ---------------------------------------------------------
def _check_block_hashes(f):
    rng = _rng(12)
    for bs in (4, 5, 16):
        what = f"blocks of {bs} tokens"
        tokens = rng.integers(0, 50, 5 * bs + 3).tolist()
        tokens[bs:2 * bs] = range(bs, 2 * bs)                   # block 1: distinct tokens (below)
        try:
            got = f(list(tokens), bs)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 — the student's code: report, don't crash
            raise CheckFailed(f"{what}: raised {type(e).__name__}: {e}") from None
        if got is None:
            raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
        got = list(got)
        if len(got) != len(tokens) // bs:
            raise CheckFailed(f"{what}: {len(tokens)} tokens in blocks of {bs} have "
                              f"{len(tokens) // bs} full blocks, you returned {len(got)} names "
                              f"(the last, partial block gets none)")
        if not all(isinstance(h, (int, np.integer)) for h in got):
            raise CheckFailed(f"{what}: return a list of ints")
        if list(f(list(tokens), bs)) != got:
            raise CheckFailed(f"{what}: two calls on the same tokens gave different names")
        if list(f(tokens[:3 * bs], bs)) != got[:3]:
            raise CheckFailed(f"{what}: a prompt's first 3 blocks must get the same names as the "
                              f"first 3 blocks of a longer prompt that begins with them")
        changed = list(tokens)
        changed[bs + 1] += 1                                    # one token of block 1
        other = list(f(changed, bs))
        if other[0] != got[0]:
            raise CheckFailed(f"{what}: changing a token of block 1 changed block 0's name; "
                              f"a block depends only on itself and the blocks before it")
        if other[1] == got[1]:
            raise CheckFailed(f"{what}: changing a token of block 1 did not change its name")
        if any(x == y for x, y in zip(other[2:], got[2:])):
            raise CheckFailed(f"{what}: changing a token of block 1 must change the names of all "
                              f"later blocks too (their keys and values change): chain each "
                              f"block's name with the name of the block before it")
        for change, how in ((lambda b: b[::-1], "the same tokens in reverse order"),
                            (lambda b: [b[0] + 2, b[1] - 2] + b[2:], "other tokens with the same sum")):
            other = list(tokens)
            other[bs:2 * bs] = change(other[bs:2 * bs])
            if list(f(other, bs))[1] == got[1]:
                raise CheckFailed(f"{what}: block 1 as {how} got the same name; a name must "
                                  f"depend on every token and its place (hash the tuple of "
                                  f"tokens, with the name before)")
        twice = tokens[:bs] * 3                                 # the same tokens at three places
        names = list(f(twice, bs))
        if len(set(names)) != 3:
            raise CheckFailed(f"{what}: the same {bs} tokens at positions 0, {bs} and {2 * bs} got "
                              f"equal names, but their keys and values differ (other positions, "
                              f"other tokens before): chain in the name of the block before")
# --- lesson 00: the model's size ----------------------------------------------------------------

def _ref_count_parameters(config) -> int:
    """Every weight of a llama-architecture model of this configuration."""
    D, V, F = config.dim, config.vocab_size, config.ffn_dim
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    layer = D + D * q + 2 * D * kv + q * D + D + 3 * D * F           # 2 norms, Q K V O, gate up down
    return V * D * (1 if config.tie_embeddings else 2) + config.n_layers * layer + D


def _check_count_parameters(f):
    from ..config import ModelConfig
    from ..weights import synthetic
    cases = [("SmolLM2-135M", dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                   head_dim=64, ffn_dim=1536, tie_embeddings=True)),
             ("a small untied model, 4 query / 2 kv heads", None),
             ("a model without GQA (as many kv heads as query heads)",
              dict(vocab_size=300, dim=48, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=12,
                   ffn_dim=80, tie_embeddings=True))]
    for what, kw in cases:
        if kw is None:                          # counted from the arrays of a real checkpoint
            hf = synthetic.hf_config(tie_word_embeddings=False)
            truth = sum(int(np.prod(s)) for s in synthetic.weight_shapes(hf).values())
            kw = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
                      n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                      n_kv_heads=hf["num_key_value_heads"],
                      head_dim=hf["head_dim"],
                      ffn_dim=hf["intermediate_size"], tie_embeddings=False)
        config = ModelConfig(**kw)
        want = _ref_count_parameters(config)
        if kw.get("tie_embeddings") is False:
            assert want == truth, (want, truth)
        got = f(config)
        if got is None:
            raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
        if int(got) == want:
            continue
        D, V = config.dim, config.vocab_size
        hq, hkv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        named = {
            want + V * D: "the LM head is tied to the embedding (config.tie_embeddings): one "
                          "[V, D] matrix serves both, count it once",
            want - V * D: "an untied model has its own LM head [V, D] besides the embedding",
            want + 2 * config.n_layers * D * (hq - hkv): "K and V have n_kv_heads heads (GQA), "
                                                         "not n_heads: [n_kv_heads * head_dim, D] each",
            want - (2 * config.n_layers + 1) * D: "the RMSNorm gains count too: 2 per layer [D] and "
                                                   "the final one",
            want - config.n_layers * D * config.ffn_dim: "the MLP has three matrices: gate, up and down",
        }
        hint = named.get(int(got))
        raise CheckFailed(f"{what}: you count {int(got):,} parameters, expected {want:,}"
                          + (f"; {hint}" if hint else ""))


# --- lesson 01: byte-pair encoding by hand ------------------------------------------------------

def _ref_bpe_ids(piece: str, merges: list[str], vocab: list[str]) -> list[int]:
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    index = {t: i for i, t in enumerate(vocab)}
    symbols = list(piece)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, np.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == np.inf:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [index[s] for s in symbols]


def _left_to_right_bpe(piece, merges, vocab):
    """The classic mistake: merge the first learned pair from the left, whatever its rank."""
    ranks = {tuple(m.split(" ")) for m in merges}
    index = {t: i for i, t in enumerate(vocab)}
    symbols = list(piece)
    merged = True
    while merged:
        merged = False
        for i in range(len(symbols) - 1):
            if (symbols[i], symbols[i + 1]) in ranks:
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                merged = True
                break
    return [index[s] for s in symbols]


def _check_bpe_ids(f):
    from ..weights import synthetic
    toy_merges = ["b c", "a b", "a bc", "c c", "d d", "dd dd"]
    toy_vocab = ["a", "b", "c", "d", "bc", "ab", "abc", "cc", "dd", "dddd"]
    real_merges, real_vocab = synthetic.tiny_merges(), synthetic.tiny_vocab()
    cases = [("abc", toy_merges, toy_vocab), ("abcabc", toy_merges, toy_vocab),
             ("ddddd", toy_merges, toy_vocab), ("cab", toy_merges, toy_vocab), ("a", toy_merges, toy_vocab)]
    byte = synthetic.bytes_to_unicode()
    for word in ["the", " the cat", "hello", " sat"]:
        piece = "".join(byte[b] for b in word.encode())
        cases.append((piece, real_merges, real_vocab))
    for piece, merges, vocab in cases:
        want = _ref_bpe_ids(piece, merges, vocab)
        got = f(piece, list(merges), list(vocab))
        what = f"piece {piece!r}" + (" with the merges " + ", ".join(repr(m) for m in merges)
                                      if merges is toy_merges else " with the tiny model's merges")
        if got is None:
            raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
        got = [int(i) for i in got]
        if got == want:
            continue
        if got == _left_to_right_bpe(piece, merges, vocab):
            raise CheckFailed(f"{what}: you get {got}, expected {want}; you merged the first "
                              f"learned pair from the left — BPE merges the pair of lowest rank "
                              f"(earliest in the list) first, wherever it is, then looks again")
        raise CheckFailed(f"{what}: you get ids {got}, expected {want} "
                          f"(the pieces {[vocab[i] for i in want]})")


# --- lesson 02: a tensor out of a GGUF file -----------------------------------------------------

def _ref_align_up(pos, alignment):
    return (pos + alignment - 1) // alignment * alignment


def _ref_read_f32_tensor(path, data_start, offset, dims):
    n = int(np.prod(dims))
    with open(path, "rb") as fh:
        fh.seek(data_start + offset)
        data = np.frombuffer(fh.read(4 * n), dtype="<f4")
    return data.reshape(tuple(reversed([int(d) for d in dims]))).astype(np.float32)


def _check_align_up(f):
    for pos, a in [(0, 32), (1, 32), (31, 32), (32, 32), (33, 32), (1000, 64), (4097, 4096)]:
        got = f(pos, a)
        want = _ref_align_up(pos, a)
        if got is None or int(got) != want:
            hint = ""
            if got is not None and int(got) == pos + a - pos % a:
                hint = "; a position already on a multiple stays where it is"
            elif got is not None and int(got) == pos // a * a:
                hint = "; round up, not down: the data starts after the header"
            raise CheckFailed(f"align_up({pos}, {a}): you give {got}, expected {want}{hint}")


def _check_read_f32_tensor(f):
    import tempfile
    rng = _rng(21)
    header = b"GGUF" + bytes(rng.integers(0, 256, 71, dtype=np.uint8))   # 75 bytes of "header"
    data_start = _ref_align_up(len(header), 32)
    tensors = [("a", [5, 3]), ("b", [7]), ("c", [4, 2, 3])]               # GGUF dims: fastest first
    blob, offsets, arrays = b"", [], []
    for _, dims in tensors:
        offsets.append(len(blob))
        a = rng.standard_normal(tuple(reversed(dims))).astype("<f4")
        arrays.append(a)
        blob += a.tobytes() + bytes(_ref_align_up(a.nbytes, 32) - a.nbytes)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "toy.gguf"
        path.write_bytes(header + bytes(data_start - len(header)) + blob)
        for (name, dims), offset, want in zip(tensors, offsets, arrays):
            what = f"tensor {name!r}, GGUF dims {dims}, offset {offset}, data_start {data_start}"
            got = f(str(path), data_start, offset, list(dims))
            if got is None:
                raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
            got = np.asarray(got)
            if got.shape == tuple(dims) and len(dims) > 1:
                raise CheckFailed(f"{what}: shape {got.shape}, expected {want.shape}: GGUF lists a "
                                  f"tensor's dimensions fastest first (ne0 = the length of a row); "
                                  f"NumPy wants them the other way round — reverse them")
            n = int(np.prod(dims))
            raw = path.read_bytes()
            from_zero = np.frombuffer(raw[offset:offset + 4 * n], "<f4").reshape(want.shape)
            expect_close(got, want, what, atol=0, rtol=0, variants=[
                ("the offset counts from the start of the data section, not of the file: read at "
                 "data_start + offset", from_zero)])
            _expect_float32(got, what)


# --- lesson 14: the whole model, your own -------------------------------------------------------

_TINY: dict = {}


def _tiny_llm():
    """The tiny random model of the tests (a GGUF written once per process, in a temp folder)."""
    if "llm" not in _TINY:
        import tempfile
        from ..llm import LLM
        from ..weights import synthetic
        d = tempfile.mkdtemp(prefix="minfer-classroom-")
        _TINY["llm"] = LLM(synthetic.tiny_checkpoint(d, fmt="gguf", seed=3), backend="numpy", quiet=True)
    return _TINY["llm"]


def _layers_variant(model, x, cos, sin, batch, cache, mistake):
    """model.run_layers with one classic mistake: "residual" (x replaced, not added to), "rope_late"
    (K written to the cache before RoPE), "one_norm" (attn_norm before the MLP too)."""
    c, W, op = model.config, model.weights, model.ops
    T = len(x)
    for l, L in enumerate(W.layers):
        h = op.rmsnorm(x, L.attn_norm, c.rms_eps)
        q = op.linear(h, L.wq).reshape(T, c.n_heads, c.head_dim)
        k = op.linear(h, L.wk).reshape(T, c.n_kv_heads, c.head_dim)
        v = op.linear(h, L.wv).reshape(T, c.n_kv_heads, c.head_dim)
        q = op.rope(q, cos, sin)
        if mistake == "rope_late":
            op.kv_write(cache.k[l], cache.v[l], k, v, batch.slot_mapping)
            k = op.rope(k, cos, sin)
        else:
            k = op.rope(k, cos, sin)
            op.kv_write(cache.k[l], cache.v[l], k, v, batch.slot_mapping)
        a = op.attention(q, cache.k[l], cache.v[l], batch)
        o = op.linear(a.reshape(T, -1), L.wo)
        x = o if mistake == "residual" else x + o
        h = op.rmsnorm(x, L.attn_norm if mistake == "one_norm" else L.ffn_norm, c.rms_eps)
        m = op.swiglu(h, L.w_gate, L.w_up, L.w_down)
        x = m if mistake == "residual" else x + m
    return x


def _ref_run_layers(x, cos, sin, batch, cache, weights, config, ops):
    from ..model import Transformer
    return Transformer(config, weights, ops).run_layers(x, cos, sin, batch, cache)


def _check_run_layers(f):
    from ..batch import make_batch
    llm = _tiny_llm()
    model, c, W, op = llm.model, llm.config, llm.weights, llm.model.ops
    rng = _rng(22)
    bs = 4
    table = [int(b) for b in rng.permutation(8)]
    prompt = [int(i) for i in rng.integers(3, c.vocab_size, 6)]
    steps = [("a 6-token prompt (prefill)", make_batch([(prompt, 0, table)], bs)),
             ("then one token at position 6 (decode, reading the prompt's keys from the cache)",
              make_batch([([int(rng.integers(3, c.vocab_size))], 6, table)], bs))]
    caches = {k: model.new_cache(n_blocks=8, block_size=bs) for k in
              ("want", "got", "residual", "rope_late", "one_norm")}
    for what, batch in steps:
        x = op.embedding(batch.token_ids, W.tok_embd)
        cos, sin = op.rope_angles(batch.positions, c.head_dim, c.rope_theta)
        want = model.run_layers(x.copy(), cos, sin, batch, caches["want"])
        variants = [(msg, _layers_variant(model, x.copy(), cos, sin, batch, caches[key], key))
                    for key, msg in [
                        ("residual", "each block's output is *added* to x (the residual stream): "
                                     "x = x + attention(...), x = x + mlp(...)"),
                        ("rope_late", "rotate K before you write it to the cache: the cache holds "
                                      "rotated keys, so later tokens never rotate them again"),
                        ("one_norm", "the MLP block has its own norm: ffn_norm, not attn_norm")]]
        x_in = x.copy()
        got = f(x, cos, sin, batch, caches["got"], W, c, op)
        expect_close(got, want, what, atol=1e-4, rtol=1e-3, variants=variants)
        if not np.array_equal(x, x_in):
            raise CheckFailed(f"{what}: your run_layers changed its input x in place (x += ...); "
                              f"write x = x + ... so the caller's array stays as it was")
        for l in range(c.n_layers):
            if not np.allclose(caches["got"].k[l], caches["want"].k[l], atol=1e-5, rtol=1e-4):
                raise CheckFailed(f"{what}: layer {l}'s keys in the cache differ from the reference's: "
                                  f"write k (after RoPE) and v with ops.kv_write(cache.k[l], "
                                  f"cache.v[l], k, v, batch.slot_mapping) in every layer")


class _CountingModel:
    """A Transformer that records how many tokens each forward call got."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def forward(self, batch, cache):
        self.calls.append(len(batch.token_ids))
        return self.model.forward(batch, cache)


def _ref_greedy_generate(model, prompt_ids, n_new):
    from ..batch import make_batch
    bs = 16
    n_blocks = -(-(len(prompt_ids) + n_new) // bs)
    cache, table = model.new_cache(n_blocks=n_blocks, block_size=bs), list(range(n_blocks))
    logits = model.forward(make_batch([(list(prompt_ids), 0, table)], bs), cache)   # prefill
    out = [int(np.argmax(logits[-1]))]
    while len(out) < n_new:                                                         # decode
        pos = len(prompt_ids) + len(out) - 1
        logits = model.forward(make_batch([([out[-1]], pos, table)], bs), cache)
        out.append(int(np.argmax(logits[-1])))
    return out


def _check_greedy_generate(f):
    llm = _tiny_llm()
    rng = _rng(23)
    for n_prompt, n_new in [(5, 6), (1, 3), (17, 4)]:
        prompt = [int(i) for i in rng.integers(3, llm.config.vocab_size, n_prompt)]
        want = _ref_greedy_generate(llm.model, prompt, n_new)
        counting = _CountingModel(llm.model)
        what = f"a {n_prompt}-token prompt, {n_new} new tokens"
        got = f(counting, list(prompt), n_new)
        if got is None:
            raise CheckFailed(f"{what}: your function returned None (forgot `return`?)")
        got = [int(t) for t in got]
        if len(got) != n_new:
            raise CheckFailed(f"{what}: you returned {len(got)} tokens, expected {n_new} (the "
                              f"prefill's logits give the first new token)")
        if got != want:
            raise CheckFailed(f"{what}: your tokens {got}, expected {want} (greedy: the arg-max of "
                              f"the last row of logits; each decode step feeds the token just chosen "
                              f"at the next position)")
        calls = counting.calls
        if calls[0] != n_prompt or any(n != 1 for n in calls[1:]) or len(calls) != n_new:
            raise CheckFailed(f"{what}: the right tokens, but your forward calls got {calls} tokens: "
                              f"prefill the prompt once ({n_prompt}), then one token a step — the KV "
                              f"cache holds the rest, so a step never re-runs the whole sequence")

# --- lesson 13: speculative decoding ----------------------------------------------------------

def _first_tokens(f, p, q, guesses, rng):
    """f on each row of guesses [n, k] -> (the first emitted token of each call, the second
    where the first guess was accepted)."""
    first, second = [], []
    us = rng.random((len(guesses), guesses.shape[1] + 1))
    for d, u in zip(guesses, us):
        got = f(p, q, d, u)
        try:
            m, tok = int(got[0]), int(got[1])
        except (TypeError, ValueError, IndexError):
            raise CheckFailed(f"return a pair (accepted m, next token) of ints, not {got!r}") from None
        if not 0 <= m <= len(d) or not 0 <= tok < p.shape[1]:
            raise CheckFailed(f"({m}, {tok}): m must be 0..{len(d)} and the token 0..{p.shape[1] - 1}")
        first.append(d[0] if m else tok)
        if m >= 1:
            second.append(d[1] if m >= 2 else tok)
    return np.array(first), np.array(second)


def _chi2_fails(draws, probs, z=4.75) -> str | None:
    """A message if the draws are not distributed as probs (chi-square at ~1e-6), else None."""
    n = len(draws)
    counts = np.bincount(draws, minlength=len(probs))
    if counts[probs == 0].any():
        return f"token {int(np.flatnonzero((probs == 0) & (counts > 0))[0])} has probability 0 but came out"
    e = probs * n
    stat = float((((counts - e) ** 2)[probs > 0] / e[probs > 0]).sum())
    df = int((probs > 0).sum()) - 1
    crit = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    if stat < crit:
        return None
    freq = counts / n
    worst = int(np.argmax(np.abs(freq - probs)))
    return (f"over {n} draws token {worst} came {freq[worst]:.3f} of the time, the target gives it "
            f"{probs[worst]:.3f}")


def _check_verify_sample(f):
    rng = _rng(13)
    V = 6
    p = np.array([[.30, .05, .25, .0, .30, .10], [.10, .40, .0, .20, .20, .10],
                  [.25, .25, .25, .25, 0, 0]])                                  # [k+1, V]
    q = np.array([[.05, .50, .05, .20, .10, .10], [.50, .05, .05, .10, .10, .20]])  # [k, V]: bad
    # all guesses agree with p == q: nothing may be rejected
    d = np.array([0, 1])
    got = f(p, p[:2].copy(), d, np.full(3, 0.999))
    if int(got[0]) != 2:
        raise CheckFailed(f"with q equal to p every guess must be accepted (p/q = 1 > u), you "
                          f"accepted {int(got[0])} of 2")
    # a guess the target gives probability 0 is always rejected
    got = f(p, q, np.array([3, 1]), np.full(3, 0.0))
    if int(got[0]) != 0:
        raise CheckFailed("token 3 has target probability 0 at the first row: its guess must be "
                          f"rejected even with u = 0, you accepted {int(got[0])}")
    n = 20_000
    guesses = np.stack([np.minimum(np.searchsorted(np.cumsum(q[i]), rng.random(n), side="right"), V - 1)
                        for i in range(2)], axis=1)                             # [n, 2] drawn from q
    first, second = _first_tokens(f, p, q, guesses, rng)
    bad = _chi2_fails(first, p[0])
    if bad:
        freq = np.bincount(first, minlength=V) / len(first)
        hint = (" — closer to the draft's q: accept each guess only with probability min(1, p/q)"
                if np.abs(freq - q[0]).sum() < np.abs(freq - p[0]).sum() else
                " — on a rejection draw from max(0, p - q), normalised (not from p), with u[k]: "
                "u[i] decided the rejection, and reusing it biases the draw")
        raise CheckFailed(f"guesses drawn from q: the first token is not distributed as p: {bad}{hint}")
    bad = _chi2_fails(second, p[1])
    if bad:
        raise CheckFailed(f"the token after an accepted guess is not distributed as p[1]: {bad}; "
                          "check each guess with its own row p[i], q[i]")
    # point masses: a fixed guess, q None
    first, _ = _first_tokens(f, p, None, np.tile([4, 3], (n // 2, 1)), rng)
    bad = _chi2_fails(first, p[0])
    if bad:
        raise CheckFailed(f"q None (a point mass at each guess): the first token is not distributed "
                          f"as p: {bad}; accept with probability p(x), else draw from p without x")


# --- the stub files the students fill in ----------------------------------------------------------
def _lessons() -> dict[int, Lesson]:
    from .. import sampling
    from ..stages import attention, embedding, kvcache, linear, mlp, rmsnorm, rope
    L = {}

    def add(n, slug, title, lesson_file, minutes, tasks, refs):
        where = "\n".join(f"    {name}: {f.__module__.replace('.', '/')}.py, {f.__name__}"
                          for name, f in refs.items())
        stub = _HEADER.format(n=n, title=title, where=where, lesson_file=lesson_file) + STUBS[n]
        L[n] = Lesson(n, slug, title, tasks, stub, minutes, refs)

    add(0, "tour", "the model's size", "00_tour.py", 10, [
        Task("count_parameters", _check_count_parameters, "per layer: two norm gains [D], W_q "
             "[Hq*hd, D], W_k and W_v [Hkv*hd, D] each, W_o [D, Hq*hd], gate and up [F, D], down "
             "[D, F]; plus the embedding [V, D], the final norm [D], and an LM head only if untied"),
    ], dict(count_parameters=_ref_count_parameters))
    add(1, "tokens", "byte-pair encoding by hand", "01_tokens.py", 20, [
        Task("bpe_ids", _check_bpe_ids, "ranks = {tuple(m.split(' ')): r for r, m in "
             "enumerate(merges)}; start from list(piece); repeatedly merge the adjacent pair with "
             "the smallest rank until none is in ranks; then vocab.index of each symbol"),
    ], dict(bpe_ids=_ref_bpe_ids))
    add(2, "weights", "a tensor out of a GGUF file", "02_weights.py", 20, [
        Task("align_up", _check_align_up, "(pos + alignment - 1) // alignment * alignment"),
        Task("read_f32_tensor", _check_read_f32_tensor, "open(path, 'rb'), seek(data_start + "
             "offset), read 4 * prod(dims) bytes, np.frombuffer(..., dtype='<f4'), reshape to the "
             "dims reversed"),
    ], dict(align_up=_ref_align_up, read_f32_tensor=_ref_read_f32_tensor))
    add(3, "embedding_rmsnorm", "embeddings and RMSNorm", "03_embedding_rmsnorm.py", 30, [
            Task("embedding", _check_embedding, "fancy indexing reads one row per id; widen the result to float32",
                 op="embedding"),
            Task("rmsnorm", _check_rmsnorm, "the mean of squares is taken per token (last axis, keepdims=True so it "
                 "broadcasts); add eps under the square root; multiply by w last", op="rmsnorm"),
        ], dict(embedding=embedding.embedding, rmsnorm=rmsnorm.rmsnorm))
    add(4, "rope", "rotary position embedding", "04_rope.py", 40, [
        Task("rope_angles", _check_rope_angles, "one frequency per pair (head_dim // 2 of them), one angle per "
             "(position, pair): an outer product; then cos and sin of it", op="rope_angles"),
        Task("rope", _check_rope, "slice the even and odd elements of the last axis (a step of 2); "
             "give cos and sin a head axis of size 1 so they broadcast; write the two results back "
             "into the even and odd places of a new array", op="rope"),
    ], dict(rope_angles=rope.rope_angles, rope=rope.rope))
    add(5, "attention", "attention and grouped-query heads", "05_attention.py", 60, [
        Task("softmax", _check_softmax, "max and sum along `axis` with keepdims=True; exp(-inf) is 0, "
             "which is how the mask works"),
        Task("paged_attention", _check_paged_attention, "work one sequence at a time: gather its S keys and values "
             "from its blocks (indexing the cache with the block list, then a reshape), repeat the kv "
             "heads so each query head has its own, score, mask with -inf where key j > the row's "
             "position, softmax, weight the values. Loops are fine; speed comes in lesson 09", op="attention"),
    ], dict(softmax=attention.softmax, paged_attention=attention.paged_attention))
    add(6, "kvcache", "the paged KV cache", "06_kvcache.py", 30, [
        Task("slot_mapping", _check_slot_mapping, "make the positions with arange, then "
             "index the table with p // block_size; numpy does all positions at once"),
        Task("kv_write", _check_kv_write, "a reshape of the cache to [n_blocks * block_size, Hkv, hd] "
             "is a view: assigning to its rows at slot_mapping writes into the cache itself", op="kv_write"),
    ], dict(slot_mapping=_ref_slot_mapping, kv_write=kvcache.kv_write))
    add(7, "mlp", "the SwiGLU MLP", "07_mlp.py", 20, [
        Task("silu", _check_silu, "z * sigmoid(z); for a sigmoid that never overflows, note "
             "sigmoid(z) = 0.5 * (1 + tanh(z / 2))"),
        Task("swiglu", _check_swiglu, "two projections up to F, one gated by silu, multiplied "
             "elementwise, then one projection down; weights are [out, in] so x @ W.T",
             op="swiglu"),
    ], dict(silu=mlp.silu, swiglu=mlp.swiglu))
    add(8, "sampling", "sampling the next token", "08_sampling.py", 40, [
        Task("apply_repetition_penalty", _check_repetition_penalty, "copy first; np.unique(seen) so that a token seen twice is "
             "penalised once; np.where picks divide or multiply by the sign"),
        Task("filter_logits", _check_filter_logits, "top-k: np.partition finds the k-th largest value; top-p: "
             "sort by probability, the mass before a token is cumsum - its own probability; min-p: "
             "compare each probability with the largest one. Work in float64"),
        Task("sample", _check_sample, "penalty, then greedy or: divide by the temperature, "
             "filter, softmax, and rng.choice(V, p=probs); return a plain int"),
    ], dict(apply_repetition_penalty=sampling.apply_repetition_penalty,
            filter_logits=sampling.filter_logits, sample=sampling.sample))
    add(9, "numba", "Numba kernels", "09_numba.py", 40, [
        Task("rmsnorm_numba", _check_rmsnorm_numba, "@njit(fastmath=True); out = np.empty_like(x); for "
             "each row t: a float32(0.0) accumulator for the sum of squares over i, then "
             "r = float32(1.0) / np.sqrt(ss / float32(D) + float32(eps)) and a second loop writes "
             "x[t, i] * r * w[i]", op="rmsnorm"),
        Task("matmul_numba", _check_matmul_numba, "@njit(parallel=True, fastmath=True); out = np.empty((T, O), "
             "dtype=np.float32); for o in prange(O): for t in range(T): acc = float32(0.0), then one "
             "flat loop over k adding x[t, k] * w[o, k]; each (t, o) is written by one iteration only",
             op="linear"),
    ], dict(rmsnorm_numba=rmsnorm.rmsnorm_numba, matmul_numba=linear._dense_matmul))
    add(10, "quant", "quantized blocks", "10_quantized_matmul.py", 40, [
        Task("quantize_q8_0", _check_quantize_q8_0, "x = w.reshape(-1, 32); d = abs(x).max(axis=1) / "
             "np.float32(127); q = round-half-away-from-zero(x * (1 / d)) (np.sign(z) * np.floor(abs(z) "
             "+ 0.5)), 0 where d == 0; fill np.zeros(n, BLOCK_DTYPES['Q8_0']) and .view(np.uint8)"),
        Task("dequantize_q8_0", _check_dequantize_q8_0, "raw.reshape(-1).view(BLOCK_DTYPES['Q8_0']) gives "
             "the blocks; widen d to float32, multiply by the int8 quants, reshape"),
        Task("dequantize_q4_1", _check_dequantize_q4_1, "view the bytes as Q4_1 blocks; q = "
             "np.concatenate([qs & 0x0F, qs >> 4], axis=1) puts the low nibbles (weights 0-15) "
             "before the high ones (16-31); w = d * q + m, all in float32"),
    ], dict(quantize_q8_0=_ref_quantize_q8_0, dequantize_q8_0=_ref_dequantize_q8_0,
            dequantize_q4_1=_ref_dequantize_q4_1))
    add(11, "gpu", "a GPU kernel", "11_gpu.py", 30, [
        Task("rmsnorm_kernel", _check_rmsnorm_kernel, "@cuda.jit; t = cuda.blockIdx.x, tid = "
             "cuda.threadIdx.x, n = cuda.blockDim.x; part = cuda.shared.array(1024, float32); "
             "ss = float32(0.0) summed over i in range(tid, D, n); part[tid] = ss; "
             "cuda.syncthreads(); then s = n // 2, n // 4, ..., 1: threads tid < s add part[tid + s] "
             "into part[tid], with cuda.syncthreads() after every step (outside the if); "
             "r = 1 / sqrt(part[0] / D + eps); each thread writes its own columns"),
    ], dict(rmsnorm_kernel=rmsnorm.rmsnorm_kernel))
    L[11].needs_cuda = True
    from ..engine import prefix_cache
    add(12, "batching", "continuous batching and the prefix cache", "12_batching.py", 20, [
            Task("block_hashes", _check_block_hashes, "h = None; for each full block i: h = "
                 "hash((h, tuple(tokens[i * block_size:(i + 1) * block_size]))); append h"),
        ], dict(block_hashes=prefix_cache.block_hashes))
    from ..spec import verify
    add(13, "speculative", "speculative decoding", "13_speculative.py", 30, [
        Task("verify_sample", _check_verify_sample, "for i in range(k): x = proposals[i]; qx = 1 if q "
             "is None else q[i, x]; accept while u[i] * qx < p[i, x]; at the first rejection build "
             "w = max(p[i] - q[i], 0) (q None: p[i] with w[x] = 0) and draw from it with u[k]: "
             "np.searchsorted(np.cumsum(w), u[k] * w.sum(), side='right'); return (i, token). All "
             "accepted: (k, a draw from p[k] with u[k])"),
    ], dict(verify_sample=verify.verify_sample))
    add(14, "capstone", "the whole model, your own", "14_capstone.py", 60, [
        Task("run_layers", _check_run_layers, "for each layer l, L = weights.layers[l]: h = "
             "ops.rmsnorm(x, L.attn_norm, eps); q, k, v = ops.linear(h, L.wq / L.wk / L.wv) reshaped "
             "to heads; rope on q and k; ops.kv_write(cache.k[l], cache.v[l], k, v, "
             "batch.slot_mapping); a = ops.attention(q, cache.k[l], cache.v[l], batch); x = x + "
             "ops.linear(a.reshape(T, -1), L.wo); then x = x + ops.swiglu(ops.rmsnorm(x, L.ffn_norm, "
             "eps), L.w_gate, L.w_up, L.w_down)", op="run_layers"),
        Task("greedy_generate", _check_greedy_generate, "cache = model.new_cache(n_blocks, 16) with "
             "enough blocks for prompt + new tokens, table = list(range(n_blocks)); logits = "
             "model.forward(make_batch([(prompt, 0, table)], 16), cache); then each step "
             "make_batch([([last], position, table)], 16); the arg-max of logits[-1] each time"),
    ], dict(run_layers=_ref_run_layers, greedy_generate=_ref_greedy_generate))
    return L


_LESSONS: dict[int, Lesson] | None = None


def lessons() -> dict[int, Lesson]:
    global _LESSONS
    if _LESSONS is None:
        _LESSONS = _lessons()
    return _LESSONS


def get_lesson(n) -> Lesson:
    L = lessons()
    which = f"lessons with exercises: {', '.join(f'{k:02d}' for k in L)} (see `python -m minfer lesson list`)"
    text = str(n).strip()
    if not text.isdigit():
        raise ExerciseError(f"a lesson is a number, such as 5 or 05, not {text!r}; {which}")
    n = int(text)
    if n not in L:
        raise ExerciseError(f"lesson {n} has no exercises; {which}")
    return L[n]


def reference_functions(n) -> dict[str, Callable]:
    """minfer's own functions for lesson n's tasks (they pass every check)."""
    return dict(get_lesson(n).references)
