"""The product of two secret-shared matrices, with plaintext-ciphertext products only.

A prompt's own attention (scores Q K^T, outputs P V) multiplies two matrices
that are both secret (both come out of the model), so over the encrypted
cache it costs a ciphertext-ciphertext product per query and block. Here both
operands stay shared and only their masked forms meet HE:

    shares_to_zp: the client holds Xz, Yz, the server Xs, Ys (mod p), with
    X = Xz - Xs, Y = Yz - Ys; the client's values are uniform. Then

        X Y = Xz Yz - Xz Ys - Xs Yz + Xs Ys

    Xz Yz: the client computes it; Xs Ys: the server does.
    Xz Ys: the client sends Enc(Xz) (column packed), the server multiplies by
           its plaintext Ys (he/columns.py).
    Xs Yz: the same, transposed: (Xs Yz)^T = Yz^T Xs^T, with Enc(Yz^T).

    The two cross terms go back as Z_p shares (he_to_zp: re-randomised,
    flooded, masked with fresh uniform values), each party adds its local
    product and transposes the second term on its own share, and the sum,
    small, becomes CrypTen shares with one multiplication of bits
    (zp_to_shares).

Messages: two masked shares (server -> client), one batch of ciphertexts
(client -> server), one batch of masked results (server -> client), one
Beaver round. What the server sees: ciphertexts under the client's key.
What the client sees: uniform masked values, and results masked with fresh
uniform values and flooded noise. Each cross term costs inner x
ceil(cols / per-ciphertext columns) plaintext products and no rotation.
"""

from __future__ import annotations

import numpy as np

from ..he.columns import ColumnProductPlan
from .convert import he_to_zp, shares_to_zp, zp_to_shares
from .wire import pack_blobs, unpack_blobs

_LIMB_BITS = 15


def matmul_mod(A: np.ndarray, B: np.ndarray, p: int) -> np.ndarray:
    """(..., r, i) @ (..., i, c) mod p, exactly, for entries in [0, p) with p < 2**45.

    Each operand is cut into three 15-bit limbs; every product of limbs
    summed over i stays below 2**53 (i < 2**22), so float64 BLAS computes it
    exactly; the limb sums are recombined by Horner's rule mod p, every
    intermediate below 2**63."""
    if p >= 1 << (3 * _LIMB_BITS) or A.shape[-1] >= 1 << 22:
        raise ValueError("matmul_mod needs p < 2**45 and an inner size below 2**22")
    mask = (1 << _LIMB_BITS) - 1
    A = np.asarray(A, dtype=np.int64)
    B = np.asarray(B, dtype=np.int64)
    a = [((A >> (_LIMB_BITS * k)) & mask).astype(np.float64) for k in range(3)]
    b = [((B >> (_LIMB_BITS * k)) & mask).astype(np.float64) for k in range(3)]
    acc = None
    for degree in range(4, -1, -1):
        g = sum((a[i] @ b[degree - i]) for i in range(3) if 0 <= degree - i < 3).astype(np.int64)
        acc = g if acc is None else ((acc % p) << _LIMB_BITS) + g
    return (acc % p).astype(np.uint64)


class _BothTerms:
    """The gather of the two cross terms' results (left's groups, then right's)."""

    def __init__(self, left: ColumnProductPlan, right: ColumnProductPlan):
        self.left, self.right = left, right

    def unpack_output(self, slots):
        n = self.left.n_groups
        return np.concatenate([self.left.unpack_output(slots[:n]).reshape(-1), self.right.unpack_output(slots[n:]).reshape(-1)])


def shared_matmul(party, x, y, x_frac_bits: int, y_frac_bits: int):
    """x (heads, r, i) @ y (heads, i, c), both MPCTensors (16 fractional bits),
    -> MPCTensor (heads, r, c) with 16 fractional bits. x enters with
    ``x_frac_bits`` fractional bits, y with ``y_frac_bits`` (their sum must be
    <= 40, and the product's magnitude below p / 4 at that scale)."""
    he, p = party.he, int(party.he.p)
    heads, r, i = x.shape
    c = y.shape[-1]
    xm = shares_to_zp(party, x, x_frac_bits).reshape(heads, r, i)  # client Xz, server Xs
    ym = shares_to_zp(party, y, y_frac_bits).reshape(heads, i, c)  # client Yz, server Ys
    left = ColumnProductPlan(heads, r, i, c, he.params)  # Enc(Xz) @ Ys
    right = ColumnProductPlan(heads, c, i, r, he.params)  # Enc(Yz^T) @ Xs^T = (Xs Yz)^T
    if party.is_client:
        slots = left.pack_input(xm) + right.pack_input(ym.transpose(0, 2, 1))
        party.channel.send("matmul.ciphertexts", pack_blobs([he.encrypt_serialized(v) for v in slots]))
        outs = None
    else:
        blobs = unpack_blobs(party.channel.recv_payload("matmul.ciphertexts"))
        if len(blobs) != 2 * i:
            raise ValueError(f"client sent {len(blobs)} ciphertexts for a shared product, expected {2 * i}")
        cts = [he.load_ct(blob) for blob in blobs]
        outs = left.apply(he, cts[:i], ym) + right.apply(he, cts[i:], xm.transpose(0, 2, 1))
    n = heads * r * c
    terms = he_to_zp(party, outs, _BothTerms(left, right), 2 * n)
    cross = (terms[:n].reshape(heads, r, c) + terms[n:].reshape(heads, c, r).transpose(0, 2, 1)) % np.uint64(p)
    # Client: Xz Yz - (Xz Ys + m1) - (Xs Yz + m2); server: Xs Ys + m1 + m2.
    # Each party's cross share already carries the sign of its role (he_to_zp:
    # client term + m, server -m), so both subtract it from their local product.
    local = matmul_mod(xm, ym, p)
    share = (local + np.uint64(p) - cross) % np.uint64(p)
    return zp_to_shares(party, share.reshape(-1), x_frac_bits + y_frac_bits).reshape(heads, r, c)
