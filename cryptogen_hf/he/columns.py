"""Encrypted matrix times plaintext matrix, per head, without rotations.

Y_h = A_h @ B_h for h < heads, with A_h (rows x inner) encrypted and B_h
(inner x cols) a plaintext the server holds. A prompt's own attention uses it
(protocol/attention_shares.py): there B is one party's secret share, new at
every pass, so its plaintexts are encoded on the fly and nothing is
pre-encoded.

Layout ("column packing"). The N slots are cut into G = N // S segments of
S = rows rounded up to a power of two. Segment g serves head g % heads and
the (g // heads)-th column of its group: a group holds P = G // heads
columns of every head.

- input: one ciphertext per inner index i; segment g holds the column
  A_h[:, i] of its head (the same for every group, so one ciphertext serves
  all groups);
- plaintext (i, J): segment g holds B_h[i, J * P + g // heads], repeated
  over the segment;
- output: one ciphertext per group J, sum over i of input_i * plaintext_(i, J):
  segment g holds the column Y_h[:, J * P + g // heads].

So inner x ceil(cols / P) plaintext products, every slot of a product
useful when rows fills its segment; no rotation at all, hence no Galois key.
"""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as sealapi


class ColumnProductPlan:
    """Shape-only: both parties build it from (heads, rows, inner, cols)."""

    def __init__(self, heads: int, rows: int, inner: int, cols: int, params):
        self.heads, self.rows, self.inner, self.cols = heads, rows, inner, cols
        self.n_slots = params.slot_count
        self.S = 1 << max(0, (rows - 1).bit_length())
        G = self.n_slots // self.S
        if G < heads:
            raise ValueError(f"{rows} rows x {heads} heads do not fit one ciphertext of {self.n_slots} slots")
        self.P = G // heads  # columns of each head per output ciphertext
        self.n_groups = -(-cols // self.P)
        segments = np.arange(self.P * heads)
        self.seg_head, self.seg_col = segments % heads, segments // heads

    @property
    def n_products(self) -> int:
        return self.inner * self.n_groups

    # -- client side ---------------------------------------------------------
    def pack_input(self, A) -> list[np.ndarray]:
        """A: (heads, rows, inner) ints -> ``inner`` slot vectors."""
        A = np.asarray(A, dtype=np.int64).reshape(self.heads, self.rows, self.inner)
        out = np.zeros((self.inner, len(self.seg_head), self.S), dtype=np.int64)
        out[:, :, : self.rows] = A[self.seg_head].transpose(2, 0, 1)  # (inner, segment, rows)
        full = np.zeros((self.inner, self.n_slots), dtype=np.int64)
        full[:, : out.shape[1] * self.S] = out.reshape(self.inner, -1)
        return list(full)

    def unpack_output(self, slots) -> np.ndarray:
        """n_groups decrypted slot vectors (or masks) -> Y: (heads, rows, cols)."""
        slots = np.asarray([np.asarray(s) for s in slots])
        if slots.shape[0] != self.n_groups:
            raise ValueError(f"{slots.shape[0]} result ciphertexts, the layout expects {self.n_groups}")
        used = slots[:, : len(self.seg_head) * self.S].reshape(self.n_groups, len(self.seg_head), self.S)[:, :, : self.rows]
        Y = np.zeros((self.heads, self.rows, self.n_groups * self.P), dtype=slots.dtype)
        for J in range(self.n_groups):
            Y[self.seg_head, :, J * self.P + self.seg_col] = used[J]
        return Y[:, :, : self.cols]

    # -- server side ---------------------------------------------------------
    def _plaintext_slots(self, B, i: int, J: int) -> np.ndarray:
        cols = J * self.P + self.seg_col
        ok = cols < self.cols
        values = np.zeros(len(self.seg_head), dtype=np.int64)
        values[ok] = B[self.seg_head[ok], i, cols[ok]]
        slots = np.zeros(self.n_slots, dtype=np.int64)
        slots[: len(values) * self.S] = np.repeat(values, self.S)
        return slots

    def apply(self, he, cts: list, B) -> list:
        """cts: the ``inner`` input ciphertexts; B: (heads, inner, cols) ints,
        encoded here. Returns the n_groups output ciphertexts."""
        if len(cts) != self.inner:
            raise ValueError(f"{len(cts)} input ciphertexts, the layout expects {self.inner}")
        B = np.asarray(B, dtype=np.int64).reshape(self.heads, self.inner, self.cols)
        ev = he.evaluator
        xs = [he.to_ntt(ct) for ct in cts]
        outs = []
        for J in range(self.n_groups):
            acc = None
            for i in range(self.inner):
                slots = self._plaintext_slots(B, i, J)
                if not slots.any():
                    continue
                prod = sealapi.Ciphertext()
                ev.multiply_plain(xs[i], he.encode_ntt(slots), prod)
                if acc is None:
                    acc = prod
                else:
                    ev.add_inplace(acc, prod)
            if acc is None:  # an all-zero B block: an encryption of zero
                acc = he.to_ntt(he.encrypt(np.zeros(1, dtype=np.int64)))
            ev.transform_from_ntt_inplace(acc)
            outs.append(acc)
        return outs

    def estimate_budget(self, model, b_in: float) -> float:
        return model.sum_of(model.after_mul_plain(b_in), self.inner)
