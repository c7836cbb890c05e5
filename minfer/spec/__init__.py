"""Speculative decoding: guess several tokens cheaply, let the target model check them in one
forward, keep the ones it agrees with — the same text (greedy) or the same distribution
(sampling) as plain decoding, for fewer target forwards.

    verify.py      the acceptance rules: greedy prefix match, and the rejection rule of
                   Leviathan et al. / Chen et al. (NumPy reference, @njit; numba.cuda kernels
                   in verify_cuda.py)
    ngram.py       prompt lookup: the tokens that followed the last n tokens' latest occurrence
    draft.py       a second, cheaper model drafts k tokens from its own KV cache
    speculator.py  the engine's calls: propose (before the batch), verify (after the forward;
                   forward_verify on a device that verifies there),
                   with KV rollback and a per-sequence k that follows the acceptance rate
"""
from .draft import DraftProposer
from .ngram import NgramProposer
from .speculator import DEFAULT_K, Speculator

MODES = ("off", "ngram", "draft")

__all__ = ["DEFAULT_K", "DraftProposer", "MODES", "NgramProposer", "Speculator"]
