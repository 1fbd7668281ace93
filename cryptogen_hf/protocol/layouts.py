"""Slot layouts that tell a conversion where values sit in the ciphertexts.

A conversion (``protocol.convert``) needs two things from the kernel on the
other side of it, and nothing else:

- ``pack_input(values) -> list of slot vectors``: where the client places a
  vector it encrypts (a placement: copies and zeros, linear, so the server can
  place its mask the same way and subtract it);
- ``unpack_output(list of slot vectors) -> values``: which slots of the
  result ciphertexts hold the outputs (a gather, so it applies to masks too).

The HE kernels' plans already expose these as methods with kernel-specific
signatures; the small adapters here give them the one shape convert.py uses.
All are shape-only: both parties build them from public sizes.
"""

from __future__ import annotations

import numpy as np


class SlotVector:
    """n values in the first n slots of one ciphertext (tests, simple kernels)."""

    def __init__(self, n: int, slot_count: int):
        if n > slot_count:
            raise ValueError(f"{n} values do not fit {slot_count} slots")
        self.n, self.slot_count = n, slot_count

    def pack_input(self, values):
        out = np.zeros(self.slot_count, dtype=np.uint64)
        out[: self.n] = np.asarray(values, dtype=np.uint64).reshape(-1)
        return [out]

    def unpack_output(self, slots):
        return np.asarray(slots[0])[: self.n]


class MatvecIO:
    """Input and output of a ``DecodeMatvecPlan``: one input ciphertext, n_tiles outputs."""

    def __init__(self, plan):
        self.plan = plan

    def pack_input(self, values):
        return [self.plan.pack_input(values)]

    def unpack_output(self, slots):
        return self.plan.unpack_output(np.stack([np.asarray(s) for s in slots]))


class QKVIntoCache:
    """The fused q|k|v vector (3d) of token t -> [query ct, key ct, value ct] for the inner cache.

    q is replicated at every token offset of a cache block (so one ct x ct
    product scores a whole block); k and v sit at token t's slot offset, zeros
    elsewhere, ready to be added into the cache ciphertext.
    """

    def __init__(self, cache_layout, t: int):
        self.cache, self.t = cache_layout, t

    def pack_input(self, values):
        v = np.asarray(values, dtype=np.int64).reshape(3, -1)
        return [self.cache.pack_query(v[0]), self.cache.pack_token(v[1], self.t), self.cache.pack_token(v[2], self.t)]


class ScoresFromCache:
    """Scores (heads x T) out of the per-block score ciphertexts of the inner cache."""

    def __init__(self, cache_layout, n_tokens: int):
        self.cache, self.n_tokens = cache_layout, n_tokens

    def unpack_output(self, slots):
        return self.cache.unpack_scores([np.asarray(s) for s in slots], self.n_tokens).reshape(-1)


class ProbsIntoCache:
    """Probabilities (heads x T) -> one ciphertext per cache block, each p[h, t] over head h's features."""

    def __init__(self, cache_layout, n_tokens: int):
        self.cache, self.n_tokens = cache_layout, n_tokens

    def pack_input(self, values):
        p = np.asarray(values, dtype=np.int64).reshape(self.cache.H, self.n_tokens)
        return list(self.cache.pack_probs(p, self.n_tokens))


class AttentionOutput:
    """The attention output (d = heads x head_dim) out of ``InnerKVCache.attend``'s ciphertext."""

    def __init__(self, cache_layout):
        self.cache = cache_layout

    def unpack_output(self, slots):
        return self.cache.unpack_out(np.asarray(slots[0])).reshape(-1)
