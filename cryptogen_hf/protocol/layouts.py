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
    """Input and output of a ``DecodeMatvecPlan`` for ``rows`` tokens at once.

    Each token is its own product (one input ciphertext, n_tiles outputs);
    batching them in one conversion keeps the rounds of a single token.
    """

    def __init__(self, plan, rows: int = 1):
        self.plan, self.rows = plan, rows

    def pack_input(self, values):
        x = np.asarray(values).reshape(self.rows, self.plan.d_in)
        return [self.plan.pack_input(row) for row in x]

    def unpack_output(self, slots):
        tiles = self.plan.n_tiles
        groups = [np.stack([np.asarray(s) for s in slots[i * tiles : (i + 1) * tiles]]) for i in range(self.rows)]
        return np.concatenate([self.plan.unpack_output(g) for g in groups])


class QKVIntoCache:
    """Fused q|k|v rows of tokens t0..t0+T-1 -> fresh ciphertexts for the inner cache.

    Order: T query ciphertexts (q replicated at every token offset of a cache
    block, so one ct x ct product scores a whole block), then T key and T
    value ciphertexts (token t's features at its slot offset, zeros elsewhere,
    ready to be added into the cache ciphertext).
    """

    def __init__(self, cache_layout, t0: int, rows: int = 1):
        self.cache, self.t0, self.rows = cache_layout, t0, rows

    def pack_input(self, values):
        v = np.asarray(values, dtype=np.int64).reshape(self.rows, 3, -1)
        positions = range(self.t0, self.t0 + self.rows)
        queries = [self.cache.pack_query(v[i, 0]) for i in range(self.rows)]
        keys = [self.cache.pack_token(v[i, 1], t) for i, t in enumerate(positions)]
        values_ = [self.cache.pack_token(v[i, 2], t) for i, t in enumerate(positions)]
        return queries + keys + values_


class ScoresFromCache:
    """Scores (T x heads x n_ctx) out of T groups of per-block score ciphertexts."""

    def __init__(self, cache_layout, n_ctx: int, rows: int = 1):
        self.cache, self.n_ctx, self.rows = cache_layout, n_ctx, rows
        self.blocks = -(-n_ctx // cache_layout.B)

    def unpack_output(self, slots):
        b = self.blocks
        return np.concatenate(
            [self.cache.unpack_scores([np.asarray(s) for s in slots[i * b : (i + 1) * b]], self.n_ctx).reshape(-1) for i in range(self.rows)]
        )


class ProbsIntoCache:
    """Probabilities (T x heads x n_ctx) -> per query, one ciphertext per cache block."""

    def __init__(self, cache_layout, n_ctx: int, rows: int = 1):
        self.cache, self.n_ctx, self.rows = cache_layout, n_ctx, rows

    def pack_input(self, values):
        p = np.asarray(values, dtype=np.int64).reshape(self.rows, self.cache.H, self.n_ctx)
        out = []
        for i in range(self.rows):
            out.extend(self.cache.pack_probs(p[i], self.n_ctx))
        return out


class AttentionOutput:
    """Attention outputs (T x d) out of ``InnerKVCache.attend``'s ciphertexts, one per query."""

    def __init__(self, cache_layout, rows: int = 1):
        self.cache, self.rows = cache_layout, rows

    def unpack_output(self, slots):
        return np.concatenate([self.cache.unpack_out(np.asarray(s)).reshape(-1) for s in slots[: self.rows]])
