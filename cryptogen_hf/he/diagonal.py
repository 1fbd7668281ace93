"""Generalized-diagonal products with baby-step/giant-step, shared by the
plaintext matvec (weights) and the encrypted-cache attention kernels.

Layout ("replicated windows"). The N slots are two rows of R = N/2; a row is
cut into *regions*, each serving one independent problem y_h = M_h x_h
("head": the whole matrix for a matvec, one attention head for attention).
Inside a region starting at slot S the input is replicated periodically:

    u[S + s] = x_h[s mod d_in]

An output o of the head sits at a window start a (relative to S) and uses the
c slots a, a+K, ..., a+(c-1)K. Slot a+mK multiplies, over the K diagonals
k = 0..K-1, the inputs u[a+mK+k]; together the c slots see the c*K >= d_in
consecutive inputs u[a .. a+cK-1], i.e. every x_h[i] exactly once (entries
past d_in get a zero weight). So

    z = sum_k rot(u, k) * D_k,   D_k[a+mK] = M_h[o, (a+mK+k) mod d_in]

followed by a fold y[a] = sum_m z[a+mK] (about log2(c) rotations). Window
starts are the a in [0, L - cK] with a mod cK < K, so a region of length L
holds ~K*L/(cK) outputs and no window ever wraps around the row.

BSGS: with k = g*n1 + b, rot(u, k) * D_k = rot(rot(u, b) * rot(D_k, -g*n1), g*n1),
so only n1-1 "baby" rotations of the input and n2-1 "giant" rotations of
partial sums are needed; the diagonals are stored pre-rotated by -g*n1.
The pre-rotation is free here: plaintext diagonals are encoded once, and
encrypted diagonals (the KV cache) are laid out that way by the client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Region:
    row: int
    start: int  # slot offset inside the row
    length: int
    head: int


@dataclass
class WindowLayout:
    """Slot bookkeeping for one tile of a diagonal product."""

    n_slots: int
    row_size: int
    d_in: int
    c: int
    K: int
    n1: int
    regions: list[Region]
    # (head, output index) per assigned output, and its absolute slot.
    out_head: np.ndarray = field(default=None)
    out_index: np.ndarray = field(default=None)
    out_slot: np.ndarray = field(default=None)

    @property
    def n2(self) -> int:
        return -(-self.K // self.n1)

    @staticmethod
    def window_starts(length: int, c: int, K: int) -> np.ndarray:
        w = c * K
        if length < w:
            return np.zeros(0, dtype=np.int64)
        a = np.arange(0, length - w + 1)
        return a[(a % w) < K]

    def assign_outputs(self, outputs_per_head: dict[int, list[int]]):
        """Place outputs (per head, in order) on the window starts of that head's regions."""
        heads, idxs, slots = [], [], []
        for h, outs in outputs_per_head.items():
            starts = []
            for r in self.regions:
                if r.head == h:
                    base = r.row * self.row_size + r.start
                    starts.extend((base + self.window_starts(r.length, self.c, self.K)).tolist())
            if len(outs) > len(starts):
                raise ValueError(f"head {h}: {len(outs)} outputs but only {len(starts)} window slots")
            heads += [h] * len(outs)
            idxs += list(outs)
            slots += starts[: len(outs)]
        self.out_head = np.asarray(heads, dtype=np.int64)
        self.out_index = np.asarray(idxs, dtype=np.int64)
        self.out_slot = np.asarray(slots, dtype=np.int64)

    # -- client side: input packing ----------------------------------------
    def pack_input(self, x_per_head) -> np.ndarray:
        """x_per_head[h] is the int vector of head h (length d_in). Returns N slots (int64)."""
        u = np.zeros(self.n_slots, dtype=np.int64)
        for r in self.regions:
            x = np.asarray(x_per_head[r.head], dtype=np.int64)
            base = r.row * self.row_size + r.start
            u[base : base + r.length] = x[np.arange(r.length) % self.d_in]
        return u

    # -- diagonals -------------------------------------------------------------
    def diagonals(self, value_fn) -> tuple[np.ndarray, np.ndarray]:
        """Pre-rotated BSGS diagonals.

        value_fn(heads, out_idx, in_idx) -> int64 values of M_h[out, in] (vectorized).
        Returns (D, nonzero): D of shape (n2, n1, N) int64, nonzero (n2, n1) bool.
        """
        N, R, K, c = self.n_slots, self.row_size, self.K, self.c
        n1, n2 = self.n1, self.n2
        # Every slot that takes part: a + m*K for each assigned output.
        m = np.arange(c)
        slot = (self.out_slot[:, None] + m[None, :] * K).ravel()  # (n_out*c,)
        head = np.repeat(self.out_head, c)
        oidx = np.repeat(self.out_index, c)
        a = np.repeat(self.out_slot, c)
        # Region base of each slot, to map an absolute slot to its input index.
        base_of = np.full(N, -1, dtype=np.int64)
        for r in self.regions:
            b0 = r.row * R + r.start
            base_of[b0 : b0 + r.length] = b0
        D = np.zeros((n2, n1, N), dtype=np.int64)
        for k in range(K):
            pos = slot + k  # never crosses a region end by construction
            off = pos - a
            ok = off < self.d_in
            if not ok.any():
                continue
            vals = np.zeros(slot.size, dtype=np.int64)
            in_idx = (pos[ok] - base_of[pos[ok]]) % self.d_in
            vals[ok] = value_fn(head[ok], oidx[ok], in_idx)
            g, b = divmod(k, n1)
            dk = np.zeros(N, dtype=np.int64)
            dk[slot] = vals
            # pre-rotate right by g*n1 inside each row: rot(D, -g n1)[s] = D[s - g n1]
            shift = g * n1
            if shift:
                dk = np.concatenate([np.roll(dk[:R], shift), np.roll(dk[R:], shift)])
            D[g, b] = dk
        nonzero = D.any(axis=2)
        return D, nonzero

    # -- rotation plan -------------------------------------------------------
    def baby_steps(self, nonzero) -> list[int]:
        return [b for b in range(1, self.n1) if nonzero[:, b].any()]

    def giant_steps(self, nonzero) -> list[int]:
        return [g * self.n1 for g in range(1, self.n2) if nonzero[g].any()]

    def fold_steps(self) -> list[int]:
        return fold_steps(self.c, self.K)


def fold_steps(c: int, stride: int) -> list[int]:
    """Rotation steps used by `fold` to compute sum_{m<c} rot(z, m*stride)."""
    steps = []
    n = 1
    for bit in bin(c)[3:]:  # bits after the leading one
        steps.append(n * stride)  # S_{2n} = S_n + rot(S_n, n*stride)
        n *= 2
        if bit == "1":
            steps.append(stride)  # S_{2n+1} = z + rot(S_{2n}, stride)
            n += 1
    return steps


def fold(he, z, c: int, stride: int):
    """sum_{m<c} rot(z, m*stride): floor(log2 c) + popcount(c) - 1 rotations."""
    s = z
    n = 1
    for bit in bin(c)[3:]:
        s = _add(he, s, he.rotate_rows(s, n * stride))
        n *= 2
        if bit == "1":
            s = _add(he, z, he.rotate_rows(s, stride))
            n += 1
    return s


def baby_giant_sum(he, baby, n1: int, n2: int, diagonal, multiply, finish_giant, giants=None):
    """sum over giant steps g of rot(sum_b baby[b] * diagonal(g, b), g * n1).

    The loop both BSGS kernels share (plaintext weight diagonals in matvec,
    encrypted diagonals in attention). ``diagonal(g, b)`` returns the operand
    or None for an all-zero diagonal (skipped); ``multiply(ct, operand)``
    returns the product; ``finish_giant(acc)`` readies a giant-step sum for
    its rotation (leave NTT form, or relinearize). ``giants``: the giant
    steps to sum (default all n2): sums over disjoint sets add up to the
    whole, which is how a product is split over processes (matvec.MatvecWork).
    Returns None when every diagonal summed is zero.
    """
    ev = he.evaluator
    total = None
    for g in range(n2) if giants is None else giants:
        acc = None
        for b in range(n1):
            operand = diagonal(g, b)
            if operand is None:
                continue
            prod = multiply(baby[b], operand)
            if acc is None:
                acc = prod
            else:
                ev.add_inplace(acc, prod)
        if acc is None:
            continue
        acc = finish_giant(acc)
        if g:
            acc = he.rotate_rows(acc, g * n1)
        if total is None:
            total = acc
        else:
            ev.add_inplace(total, acc)
    return total


def _add(he, a, b):
    import tenseal.sealapi as sealapi

    out = sealapi.Ciphertext()
    he.evaluator.add(a, b, out)
    return out


def bsgs_cost(K: int, n1: int, tiles: int, t: dict) -> float:
    """Estimated seconds of one evaluation (used by the planners)."""
    n2 = -(-K // n1)
    return (
        tiles * K * (t["mul"] + t["add"])
        + (n1 - 1) * t["rot"]
        + n1 * t["ntt"]
        + tiles * ((n2 - 1) * t["rot"] + n2 * t["intt"])
    )


# Single-thread costs measured on this machine (N=8192, 4 data primes), which
# the planners compare. The last three weigh what packing several tokens per
# ciphertext saves: a ciphertext through the shares -> HE conversion (client
# encrypts, server loads and unmasks), one through HE -> shares (server
# re-randomises and floods, client decrypts), and encoding one plaintext
# diagonal, which a packed pass does for its weights on the fly. They were
# measured with today's 3 + 1 prime chain (6.8, 11.4 and 1.0 ms) and are
# given here at the older chain's scale (x 1.6, what products and rotations
# sped up by), so that all the figures stay comparable.
DEFAULT_COSTS = {
    "mul": 0.45e-3, "add": 0.12e-3, "rot": 5.6e-3, "ntt": 1.2e-3, "intt": 0.8e-3, "mul_ct": 20e-3, "relin": 7.7e-3,
    "to_he": 11e-3, "from_he": 18e-3, "encode": 1.6e-3,
}


def best_n1(K: int, tiles: int, t: dict) -> int:
    best = min(range(1, K + 1), key=lambda n1: (bsgs_cost(K, n1, tiles, t), n1))
    return best


def fold_rotations(c: int) -> int:
    return len(fold_steps(c, 1))


def ilog2(x: int) -> int:
    return int(math.log2(x))
