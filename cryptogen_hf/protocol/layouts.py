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
    """Input and output of a ``MatvecPlan`` for ``rows`` tokens at once: the
    plan's ``tokens`` rows per input ciphertext (the last one partly empty),
    ``n_tiles`` output ciphertexts each. Batching all rows in one conversion
    keeps the rounds of a single token."""

    def __init__(self, plan, rows: int = 1):
        self.plan, self.rows = plan, rows
        self.groups = -(-rows // plan.tokens)  # groups of ``tokens`` rows
        self.ciphertexts = self.groups * plan.n_inputs  # input ciphertexts

    def pack_input(self, values):
        x = np.asarray(values).reshape(self.rows, self.plan.d_in)
        m = self.plan.tokens
        return [v for i in range(self.groups) for v in np.atleast_2d(self.plan.pack_rows(x[i * m : (i + 1) * m]))]

    def unpack_output(self, slots):
        tiles = self.plan.n_tiles
        if len(slots) != self.groups * tiles:
            raise ValueError(f"{len(slots)} result ciphertexts, the layout expects {self.groups * tiles}")
        groups = [self.plan.unpack_rows(np.stack([np.asarray(s) for s in slots[i * tiles : (i + 1) * tiles]])) for i in range(self.groups)]
        return np.concatenate(groups)[: self.rows].reshape(-1)


class OuterPart:
    """The prompt tokens kept in the outer layout (``OuterAttentionPlan``) and how
    many of them are still in use (a crop may shorten it without touching the
    ciphertexts: the tokens past ``n_tokens`` get no score and zero probability)."""

    def __init__(self, plan, n_tokens: int | None = None):
        self.plan = plan
        self.n_tokens = plan.T if n_tokens is None else n_tokens


def pack_outer_kv(plan, K, V) -> list:
    """Slot vectors of the nonzero K diagonals, then the nonzero V diagonals, of an
    outer tile. K, V: (T, heads, d_head) ints."""
    (k_diag, _), (v_diag, _) = plan.pack_keys(K), plan.pack_values(V)
    k_nonzero, v_nonzero = plan.key_value_nonzero()
    return list(k_diag[k_nonzero]) + list(v_diag[v_nonzero])


def unpack_outer_kv(plan, cts: list) -> tuple[list, list]:
    """The inverse placement at the server: (K, V) diagonals as (giant x baby)
    nested lists, None where a diagonal is zero by shape."""
    nested = []
    for nonzero in plan.key_value_nonzero():
        n = int(nonzero.sum())
        it, cts = iter(cts[:n]), cts[n:]
        nested.append([[next(it) if nz else None for nz in row] for row in nonzero])
    if cts:
        raise ValueError(f"{len(cts)} ciphertexts more than the layout expects")
    return nested[0], nested[1]


class QKVIntoCache:
    """Fused q|k|v rows of T tokens -> fresh ciphertexts for the encrypted cache.

    A row holds ``groups`` query vectors (grouped-query attention: each of the
    cache's key/value heads serves ``groups`` query heads; the j-th vector
    holds the j-th query head of every group), then k, then v, each the
    width of the cache's heads.

    Order: T x groups query ciphertexts for the inner part (q replicated at
    every token offset of a block, so one ct x ct product scores a whole
    block), T key and T value ciphertexts (token t's features at its inner
    slot offset, zeros elsewhere, ready to be added into the block); then,
    optionally,
      ``outer_query``: T x groups query ciphertexts in the outer layout
        (decode steps that score against a prompt stored outer);
      ``outer_store``: the nonzero K diagonals then V diagonals of these T
        tokens (the prefill pass that stores the prompt outer).
    ``t0`` is the first token's index inside the inner part.
    """

    def __init__(self, cache_layout, t0: int, rows: int = 1, outer_query=None, outer_store=None, groups: int = 1):
        self.cache, self.t0, self.rows, self.groups = cache_layout, t0, rows, groups
        self.outer_query, self.outer_store = outer_query, outer_store
        if outer_store is not None and outer_store.T != rows:
            raise ValueError(f"an outer tile for {outer_store.T} tokens cannot store {rows}")

    def pack_input(self, values):
        g = self.groups
        v = np.asarray(values, dtype=np.int64).reshape(self.rows, g + 2, -1)
        positions = range(self.t0, self.t0 + self.rows)
        out = [self.cache.pack_query(v[i, j]) for i in range(self.rows) for j in range(g)]
        out += [self.cache.pack_token(v[i, g], t) for i, t in enumerate(positions)]
        out += [self.cache.pack_token(v[i, g + 1], t) for i, t in enumerate(positions)]
        if self.outer_query is not None:
            out += [self.outer_query.pack_query(v[i, j]) for i in range(self.rows) for j in range(g)]
        if self.outer_store is not None:
            shape = (self.rows, self.outer_store.H, self.outer_store.dh)
            out += pack_outer_kv(self.outer_store, v[:, g].reshape(shape), v[:, g + 1].reshape(shape))
        return out

    def split(self, cts: list) -> dict:
        """The server's ciphertexts by role, in the order ``pack_input`` made them;
        outer diagonals as (giant x baby) nested lists with None for zero ones."""
        T, nq = self.rows, self.rows * self.groups
        parts = {"q": cts[:nq], "k": cts[nq : nq + T], "v": cts[nq + T : nq + 2 * T]}
        rest = cts[nq + 2 * T :]
        if self.outer_query is not None:
            parts["q_outer"], rest = rest[:nq], rest[nq:]
        if self.outer_store is not None:
            parts["k_diag"], parts["v_diag"] = unpack_outer_kv(self.outer_store, rest)
        elif rest:
            raise ValueError(f"{len(rest)} ciphertexts more than the layout expects")
        return parts


class PromptKVIntoCache:
    """A conversation's first pass: the k|v rows of its T tokens -> the fresh
    ciphertexts of a new cache, whole blocks at once (no queries: the prompt's
    own attention runs on shares, protocol/shared_matmul.py).

    Inner layout: ceil(T / B) key blocks, then as many value blocks, each
    with every token at its slot offset (``InnerKVCache.load_blocks``).
    Outer layout (``outer_store``): the nonzero K diagonals then V diagonals.
    """

    def __init__(self, cache_layout, rows: int, outer_store=None):
        self.cache, self.rows, self.outer_store = cache_layout, rows, outer_store
        if outer_store is not None and outer_store.T != rows:
            raise ValueError(f"an outer tile for {outer_store.T} tokens cannot store {rows}")
        self.n_blocks = -(-rows // cache_layout.B)

    def pack_input(self, values):
        kv = np.asarray(values, dtype=np.int64).reshape(self.rows, 2, -1)
        if self.outer_store is not None:
            shape = (self.rows, self.outer_store.H, self.outer_store.dh)
            return pack_outer_kv(self.outer_store, kv[:, 0].reshape(shape), kv[:, 1].reshape(shape))
        out = []
        for which in range(2):
            blocks = np.zeros((self.n_blocks, self.cache.n_slots), dtype=np.int64)
            for t in range(self.rows):
                blocks[t // self.cache.B] += self.cache.pack_token(kv[t, which], t)
            out.extend(blocks)
        return out

    def split(self, cts: list) -> tuple[list, list]:
        """(K, V): block lists (inner) or (giant x baby) diagonal lists (outer)."""
        if self.outer_store is not None:
            return unpack_outer_kv(self.outer_store, cts)
        if len(cts) != 2 * self.n_blocks:
            raise ValueError(f"{len(cts)} ciphertexts, the layout expects {2 * self.n_blocks}")
        return cts[: self.n_blocks], cts[self.n_blocks :]


class ScoresFromCache:
    """Scores (T x heads x n_ctx) out of, per query: the outer part's score
    ciphertext (if any), then one ciphertext per inner block."""

    def __init__(self, cache_layout, n_inner: int, rows: int = 1, outer: OuterPart | None = None):
        self.cache, self.n_inner, self.rows, self.outer = cache_layout, n_inner, rows, outer
        self.per_row = -(-n_inner // cache_layout.B) + (outer is not None)

    def unpack_output(self, slots):
        rows = []
        for i in range(self.rows):
            group = [np.asarray(s) for s in slots[i * self.per_row : (i + 1) * self.per_row]]
            parts = []
            if self.outer is not None:
                parts.append(self.outer.plan.unpack_scores(group.pop(0))[:, : self.outer.n_tokens])
            parts.append(self.cache.unpack_scores(group, self.n_inner))
            rows.append(np.concatenate(parts, axis=1).reshape(-1))
        return np.concatenate(rows)


class ProbsIntoCache:
    """Probabilities (T x heads x n_ctx) -> per query: the outer part's probability
    ciphertext (if any; zero past its tokens in use), then one per inner block."""

    def __init__(self, cache_layout, n_inner: int, rows: int = 1, outer: OuterPart | None = None):
        self.cache, self.n_inner, self.rows, self.outer = cache_layout, n_inner, rows, outer

    def pack_input(self, values):
        n_outer = self.outer.n_tokens if self.outer is not None else 0
        p = np.asarray(values, dtype=np.int64).reshape(self.rows, self.cache.H, n_outer + self.n_inner)
        out = []
        for i in range(self.rows):
            if self.outer is not None:
                padded = np.zeros((self.cache.H, self.outer.plan.T), dtype=np.int64)
                padded[:, :n_outer] = p[i, :, :n_outer]
                out.append(self.outer.plan.pack_probs(padded))
            out.extend(self.cache.pack_probs(p[i, :, n_outer:], self.n_inner))
        return out


class AttentionOutput:
    """Attention outputs out of one ciphertext per query from the inner part, then
    (if any) one per query from the outer part: (parts x T x d) values, which the
    caller adds up on the shares."""

    def __init__(self, cache_layout, rows: int = 1, outer: OuterPart | None = None):
        self.cache, self.rows, self.outer = cache_layout, rows, outer

    @property
    def parts(self) -> int:
        return 1 + (self.outer is not None)

    def unpack_output(self, slots):
        T = self.rows
        out = [self.cache.unpack_out(np.asarray(s)).reshape(-1) for s in slots[:T]]
        if self.outer is not None:
            out += [self.outer.plan.unpack_out(np.asarray(s)).reshape(-1) for s in slots[T : 2 * T]]
        return np.concatenate(out)
