"""The exercise files that `python -m minfer lesson start N` writes: minfer's reference
signatures with the bodies left to the student."""

_HEADER = '''"""minfer classroom — lesson {n:02d}: {title}.

Fill in the function bodies (each now raises NotImplementedError), then check your work:

    python -m minfer lesson check {n}

Each function has the signature of minfer's own reference:
{where}
Read the lesson (lessons/{lesson_file}) first; peek at the reference only when you are stuck.
Once a function the model uses passes (lessons 03-07, 09 and 14), `python -m minfer chat
--use-mine` runs the real model with it.
"""
import numpy as np
'''

STUBS = {
    0: '''

def count_parameters(config):
    """config: a minfer ModelConfig (vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim,
    ffn_dim, tie_embeddings) -> the number of weights in the model, an int.

    Count every matrix and every norm gain of lesson 00's forward pass. SmolLM2-135M has
    134,515,008 — which is where the "135M" in its name comes from.
    """
    raise NotImplementedError("lesson 00: count_parameters")
''',
    1: '''

def bpe_ids(piece, merges, vocab):
    """piece: one pre-tokenized piece, already in byte-level characters (a space is "Ġ");
    merges: the GGUF's list of "left right" strings, best (earliest) first;
    vocab: the list of token strings (a token's id is its index) -> the piece's token ids.

    Start from the piece's characters; merge the adjacent pair whose merge comes earliest in
    `merges`, again and again, until no adjacent pair is in `merges`; then look the pieces up.
    """
    raise NotImplementedError("lesson 01: bpe_ids")
''',
    2: '''

def align_up(pos, alignment):
    """The first multiple of `alignment` at or after byte `pos` (where a GGUF's data begins,
    after its header: alignment is general.alignment, 32 by default)."""
    raise NotImplementedError("lesson 02: align_up")


def read_f32_tensor(path, data_start, offset, dims):
    """One F32 tensor out of a GGUF file, read by hand -> a float32 array.

    data_start: where the data section begins (align_up of the header's end);
    offset: the tensor's offset, as its header entry gives it (from data_start);
    dims: its dimensions as the header lists them — fastest first (dims[0] is a row's length).
    The values are little-endian float32, row after row.
    """
    raise NotImplementedError("lesson 02: read_f32_tensor")
''',
    3: '''

def embedding(token_ids, table):
    """token_ids [T] int, table [V, D] -> x [T, D] float32.

    Each token id picks one row of the table. The result is float32 even when the table is not.
    """
    raise NotImplementedError("lesson 03: embedding")


def rmsnorm(x, w, eps):
    """x [T, D], w [D], eps float -> [T, D].

        y = x / sqrt(mean(x^2) + eps) * w       (the mean over each token's D values)
    """
    raise NotImplementedError("lesson 03: rmsnorm")
''',
    4: '''

def rope_angles(positions, head_dim, base):
    """positions [T] int -> (cos, sin), each [T, head_dim // 2] float32.

    Pair i turns by angle positions * theta_i with theta_i = base ** (-2 i / head_dim).
    Tip: compute the angles in float64 (positions reach the thousands) and cast at the end.
    """
    raise NotImplementedError("lesson 04: rope_angles")


def rope(x, cos, sin):
    """x [T, H, hd], cos/sin [T, hd // 2] -> [T, H, hd], a new array.

    Pair i of each head is (x[..., 2i], x[..., 2i+1]); rotate it by the angle of row t:
        (a, b) -> (a cos - b sin, a sin + b cos)
    The same cos/sin serve every head (broadcast over H).
    """
    raise NotImplementedError("lesson 04: rope")
''',
    5: '''

def softmax(s, axis=-1):
    """Probabilities along `axis`: exp(s) / sum(exp(s)). -inf entries get probability 0.
    Large scores must not overflow: subtract the max along the axis first."""
    raise NotImplementedError("lesson 05: softmax")


def paged_attention(q, k_cache, v_cache, batch):
    """q [T, Hq, hd]; k_cache, v_cache [n_blocks, block_size, Hkv, hd] -> out [T, Hq, hd].

    For each sequence b of the batch (see minfer/batch.py):
      rows      batch.seq_starts[b] : batch.seq_starts[b + 1]     its rows of q and out
      S         batch.context_lens[b]                             how many keys it has
      blocks    batch.block_tables[b]                             where its keys live, in order:
                key j is k_cache[blocks[j // block_size], j % block_size]
    A query row at position batch.positions[t] sees keys 0 .. positions[t] (the causal mask).
    Query head h reads kv head h // (Hq // Hkv). Scores are q.k / sqrt(hd); out = softmax(scores) V.
    Your softmax above is yours to use.
    """
    raise NotImplementedError("lesson 05: paged_attention")
''',
    6: '''

def slot_mapping(block_table, start, stop, block_size):
    """Cache slots of positions start .. stop-1 of one sequence -> int array [stop - start].

    Position p lives in block block_table[p // block_size], row p % block_size;
    its slot (its row in the flattened pool) is block * block_size + row.
    """
    raise NotImplementedError("lesson 06: slot_mapping")


def kv_write(k_cache, v_cache, k, v, slot_mapping):
    """Write the new tokens' keys and values into their slots, in place; return nothing.

    k_cache, v_cache [n_blocks, block_size, Hkv, hd]; k, v [T, Hkv, hd]; slot_mapping [T].
    Tip: k_cache.reshape(n_blocks * block_size, Hkv, hd) is a view of the same memory.
    """
    raise NotImplementedError("lesson 06: kv_write")
''',
    7: '''

def silu(z):
    """silu(z) = z * sigmoid(z) = z / (1 + exp(-z)), elementwise. Mind exp overflowing for z << 0."""
    raise NotImplementedError("lesson 07: silu")


def swiglu(x, w_gate, w_up, w_down):
    """x [T, D]; w_gate, w_up [F, D]; w_down [D, F] -> [T, D].

        out = ( silu(x W_gate^T) * (x W_up^T) ) W_down^T        (weights are stored [out, in])
    """
    raise NotImplementedError("lesson 07: swiglu")
''',
    8: '''

def apply_repetition_penalty(logits, seen, penalty):
    """logits [V], seen: token ids already in the text, penalty > 0 -> new logits [V].

    Each seen token (once, however often it was seen) becomes less likely: a positive logit is
    divided by the penalty, a negative one multiplied. Do not modify `logits` in place.
    """
    raise NotImplementedError("lesson 08: apply_repetition_penalty")


def filter_logits(logits, p):
    """logits [V] (already divided by the temperature), p: minfer.SamplingParams -> logits [V]
    with the dropped tokens set to -inf, applied in this order:

      p.top_k > 0    keep the k largest logits
      p.top_p < 1    sort by probability; keep a token while the mass *before* it is < top_p
      p.min_p > 0    drop tokens whose probability is below min_p x the largest probability
    """
    raise NotImplementedError("lesson 08: filter_logits")


def sample(logits, p, rng, seen=None):
    """logits [V] -> the next token id (an int).

    Apply the repetition penalty (when `seen` is given); if p.temperature == 0 take the arg-max;
    else divide by the temperature, filter, softmax, and draw one id with `rng`
    (a numpy Generator, e.g. rng.choice).
    """
    raise NotImplementedError("lesson 08: sample")
''',
    9: '''
from numba import float32, njit, prange

# Lesson 09's rules: one flat loop over the contiguous axis, float32 accumulators (float32(0.0),
# not 0.0), fastmath=True so the sum can be reordered into SIMD lanes, prange for the outer loop.
# The check insists both functions are compiled: uncomment the decorators when you write the
# bodies.


# @njit(fastmath=True)
def rmsnorm_numba(x, w, eps):
    """x [T, D] float32, w [D] float32, eps float -> a new [T, D] float32 array.

        out[t, i] = x[t, i] / sqrt(mean over i of x[t, i]^2 + eps) * w[i]

    Same numbers as lesson 03's rmsnorm, written as loops: for each row, one loop for the sum of
    squares, one to write the output. Do not change x.
    """
    raise NotImplementedError("lesson 09: rmsnorm_numba")


# @njit(parallel=True, fastmath=True)
def matmul_numba(x, w):
    """x [T, K] float32, w [O, K] float32 (stored [out, in]) -> out [T, O] float32.

        out[t, o] = sum over k of x[t, k] * w[o, k]          (that is x @ w.T)

    Make prange walk the output rows o: each iteration then writes its own outputs only, and
    reads one contiguous row of w. T is 1 when decoding, so do not parallelise over t alone.
    """
    raise NotImplementedError("lesson 09: matmul_numba")
''',
    10: '''
from minfer.stages.quant import BLOCK_DTYPES      # numpy views of one block (d, m, qs fields)

# minfer's reference handles every format at once: quant.quantize(w, fmt) and
# quant.dequantize(raw, fmt, shape). Here you write one format per function. The checks compare
# your bytes and floats with the reference bit for bit. (These functions are checked, not
# plugged into the engine.)


def quantize_q8_0(w):
    """w float32 [..., K] (K a multiple of 32) -> the raw GGUF bytes, uint8 [..., K // 32 * 34].

    Each block of 32 consecutive weights along the last axis becomes 34 bytes:
        d  float16 (little-endian)   d = max |w| / 127, computed in float32
        q  32 x int8                 q = round(w * (1 / d)), halves rounded AWAY from zero
    A block of zeros has d = 0 and q = 0 (no division by zero).
    Careful: np.round rounds halves to the even neighbour (2.5 -> 2); here 2.5 -> 3, -2.5 -> -3.
    Use the float32 d for 1 / d; only the stored d is rounded to float16.
    """
    raise NotImplementedError("lesson 10: quantize_q8_0")


def dequantize_q8_0(raw, shape):
    """raw uint8 bytes of Q8_0 blocks -> float32 array of `shape` (blocks along the last axis).

        w = d * q        (d: float16 widened to float32, q: int8)
    """
    raise NotImplementedError("lesson 10: dequantize_q8_0")


def dequantize_q4_1(raw, shape):
    """raw uint8 bytes of Q4_1 blocks (20 bytes each) -> float32 array of `shape`.

    A block: d float16, m float16, then 16 bytes of 4-bit quants q in 0..15:
        byte j holds weight j in its LOW nibble (byte & 0x0F)
                 and weight j + 16 in its HIGH nibble (byte >> 4)
        w = d * q + m        (in float32)
    """
    raise NotImplementedError("lesson 10: dequantize_q4_1")
''',
    11: '''
import math

from numba import cuda, float32

# A GPU kernel is one function that every thread of the launch runs, each with its own
# cuda.blockIdx / cuda.threadIdx. The check launches yours as
#     rmsnorm_kernel[T, threads](x, w, eps, out)        # grid (T,) blocks, block (threads,)
# with device arrays, threads a power of two (4 to 16; on a GPU up to 1024), and D larger than,
# equal to and smaller than the number of threads. Without a GPU it runs under numba's simulator
# (NUMBA_ENABLE_CUDASIM=1: `lesson check 11` sets it), where every thread is a Python thread:
# slow, but exact about which thread touches what. Uncomment the decorator when you write the body.


# @cuda.jit
def rmsnorm_kernel(x, w, eps, out):
    """One block per token row: block t = cuda.blockIdx.x normalises row t of x [T, D] into out.

        out[t, i] = x[t, i] / sqrt(mean over i of x[t, i]^2 + eps) * w[i]

    1. Thread tid = cuda.threadIdx.x of n = cuda.blockDim.x sums the squares of its own columns
       tid, tid + n, tid + 2n, ... (a float32 accumulator: float32(0.0)).
    2. It stores that partial sum in shared memory, part = cuda.shared.array(1024, float32) (the
       size must be a constant), and waits for the others: cuda.syncthreads().
    3. A tree adds the n partial sums: for s = n // 2, n // 4, ..., 1 the threads tid < s add
       part[tid + s] into part[tid]; every thread reaches cuda.syncthreads() after each step.
       (No warp shuffles: shared memory and barriers only.)
    4. Every thread reads the total part[0], computes r = 1 / sqrt(total / D + eps) (math.sqrt),
       and writes out[t, i] = x[t, i] * r * w[i] for its own columns.
    Write only into out; x and w are read-only.
    """
    raise NotImplementedError("lesson 11: rmsnorm_kernel")
''',
    12: '''

def block_hashes(tokens, block_size):
    """tokens: a list of ints, block_size: int -> a list of ints, one per FULL block.

    A block's name must depend on its own tokens AND on every token before it (its keys and
    values do): two prompts get the same name for block i exactly when their first
    (i + 1) * block_size tokens are equal. A last, partial block gets no name (its tokens are
    still coming). Python's hash() of a tuple is deterministic for ints and tuples of ints.
    """
    raise NotImplementedError("lesson 12: block_hashes")
''',
    13: '''

def verify_sample(p, q, proposals, u):
    """The rejection rule of speculative sampling -> (m, token): how many guesses are accepted,
    and the token that comes after them.

    p [k+1, V]  the target's distributions: p[i] is the next token's after the first i guesses
    q [k, V]    the distributions the guesses were drawn from (None: each guess is a point mass,
                q[i] = 1 at proposals[i], as a guess from text lookup is)
    proposals [k] the guesses; u [k+1] uniform numbers in [0, 1), your only randomness

    For i = 0, 1, ...: accept guess x = proposals[i] with probability min(1, p[i, x] / q[i, x])
    (u[i] < p / q; careful, q[i, x] can be larger than p[i, x] or p[i, x] can be 0). At the first
    rejection, draw the token from max(0, p[i] - q[i]), normalised, and return (i, that token).
    If all k are accepted, draw one more from p[k] and return (k, it). Use u[k] for the one draw
    (it is not used otherwise): the first token whose running sum exceeds u[k] * total.
    Then every emitted token is distributed exactly as p — the check draws 20,000 times to see.
    """
    raise NotImplementedError("lesson 13: verify_sample")
''',
    14: '''
from minfer.batch import make_batch


def run_layers(x, cos, sin, batch, cache, weights, config, ops):
    """The transformer layers, wired from the stage functions in `ops` (yours, with --use-mine):
    x [T, D] -> [T, D]; every layer writes its keys and values into the cache.

    weights.layers[l] has attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
    config has n_heads, n_kv_heads, head_dim, rms_eps; cache.k[l], cache.v[l] are layer l's pool;
    ops has embedding, rmsnorm, rope, kv_write, attention, linear, swiglu (lessons 03-07).
    Leave x itself unchanged: x = x + ..., not x += ...
    """
    raise NotImplementedError("lesson 14: run_layers")


def greedy_generate(model, prompt_ids, n_new):
    """n_new tokens after prompt_ids, greedily -> a list of ints.

    model.new_cache(n_blocks, block_size) makes a KV cache; model.forward(batch, cache) runs a
    batch (make_batch([(token_ids, first_position, block_table)], block_size)) and returns the
    logits of its last row. Prefill the prompt in one call, then decode one token per call.
    """
    raise NotImplementedError("lesson 14: greedy_generate")
''',
}
