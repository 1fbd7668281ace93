"""ct x pt linear layers: y = x @ W with W (d_in x d_out) plaintext at the server.

Plans are *shape-only* objects: client and server both build the same plan
from (d_in, d_out[, T]) and the HE params, so the client can lay out its
input (`pack_input`) and read the result (`unpack_output`) without knowing W
or the kernel internals. Only the server calls `encode_weights` / `apply`.

Security note: output ciphertexts also carry partial sums in slots that are
not outputs. Before a ciphertext leaves the server it must be masked with a
uniform mask over *all* N slots (the HE -> shares conversion does that).
"""

from __future__ import annotations

import math

import numpy as np
import tenseal.sealapi as sealapi

from .diagonal import DEFAULT_COSTS, Region, WindowLayout, baby_giant_sum, best_n1, bsgs_cost, fold, fold_rotations


class DecodeMatvecPlan:
    """One token: encrypted x (d_in) times plaintext W (d_in x d_out).

    Input layout: x replicated periodically over both rows (slot s of a row
    holds x[s mod d_in]); one ciphertext. Output: ceil(d_out / capacity)
    ciphertexts ("tiles"); y[o] sits at one slot of one tile.
    """

    def __init__(self, d_in: int, d_out: int, params, costs: dict | None = None, c: int | None = None, n1: int | None = None):
        self.d_in, self.d_out = d_in, d_out
        self.n_slots, self.row_size = params.slot_count, params.row_size
        R = self.row_size
        if d_in > R:
            raise ValueError(f"d_in={d_in} > row size {R}: split the input into chunks of <= {R}")
        t = costs or DEFAULT_COSTS
        best = None
        for cc in ([c] if c else range(1, min(d_in, 64) + 1)):
            K = -(-d_in // cc)
            per_row = len(WindowLayout.window_starts(R, cc, K))
            if per_row == 0:
                continue
            tiles = -(-d_out // (2 * per_row))
            nn1 = n1 or best_n1(K, tiles, t)
            cost = bsgs_cost(K, nn1, tiles, t) + tiles * fold_rotations(cc) * t["rot"]
            if best is None or cost < best[0]:
                best = (cost, cc, K, nn1, tiles, per_row)
        self.est_seconds, self.c, self.K, self.n1, self.n_tiles, per_row = best
        regions = [Region(0, 0, R, 0), Region(1, 0, R, 0)]
        cap = 2 * per_row
        self.tiles = []
        for ti in range(self.n_tiles):
            lay = WindowLayout(self.n_slots, R, d_in, self.c, self.K, self.n1, regions)
            lay.assign_outputs({0: list(range(ti * cap, min(d_out, (ti + 1) * cap)))})
            self.tiles.append(lay)

    # -- client side ---------------------------------------------------------
    def pack_input(self, x_int) -> np.ndarray:
        x = np.asarray(x_int, dtype=np.int64).reshape(-1)
        if x.size != self.d_in:
            raise ValueError(f"expected {self.d_in} inputs, got {x.size}")
        return self.tiles[0].pack_input({0: x})

    def unpack_output(self, slots) -> np.ndarray:
        """slots: (n_tiles, N) array (or list) of decrypted slot values -> y (d_out,)."""
        slots = np.atleast_2d(np.asarray(slots))
        y = np.zeros(self.d_out, dtype=slots.dtype)
        for ti, lay in enumerate(self.tiles):
            y[lay.out_index] = slots[ti, lay.out_slot]
        return y

    # -- server side ---------------------------------------------------------
    def encode_weights(self, he, W) -> list:
        """Encode all diagonals once, in NTT form. W: int array (d_in, d_out), centred."""
        W = np.asarray(W, dtype=np.int64)
        assert W.shape == (self.d_in, self.d_out), W.shape
        enc = []
        self._nonzero = []
        for lay in self.tiles:
            D, nz = lay.diagonals(lambda h, o, i: W[i, o])
            pts = [[he.encode_ntt(D[g, b]) if nz[g, b] else None for b in range(self.n1)] for g in range(lay.n2)]
            enc.append(pts)
            self._nonzero.append(nz)
        return enc

    def galois_steps(self) -> set[int]:
        steps = set(range(1, self.n1))
        for lay in self.tiles:
            steps |= {g * self.n1 for g in range(1, lay.n2)}
            steps |= set(lay.fold_steps())
        return steps

    def apply(self, he, weights, ct) -> list:
        """Encrypted x (packed by pack_input) -> list of n_tiles output ciphertexts."""
        ev = he.evaluator
        # Baby steps: n1 rotations of the input, each moved to NTT form once.
        baby = []
        for b in range(self.n1):
            r = ct if b == 0 else he.rotate_rows(ct, b)
            baby.append(he.to_ntt(r))
        def multiply_plain(ct, pt):
            prod = sealapi.Ciphertext()
            ev.multiply_plain(ct, pt, prod)
            return prod

        def leave_ntt(acc):
            ev.transform_from_ntt_inplace(acc)  # rotations need coefficient form
            return acc

        outs = []
        for lay, pts in zip(self.tiles, weights):
            total = baby_giant_sum(he, baby, self.n1, lay.n2, lambda g, b: pts[g][b], multiply_plain, leave_ntt)
            outs.append(fold(he, total, self.c, self.K))
        return outs

    def estimate_budget(self, model, b_in: float) -> float:
        b = model.after_rotate(b_in)  # baby rotation
        b = model.after_mul_plain(b)
        b = model.sum_of(b, self.K)
        b = model.after_rotate(b)  # giant rotation
        return model.after_rotate(b, fold_rotations(self.c)) - math.log2(max(self.c, 1))


class PrefillMatvecPlan:
    """T tokens at once: X (T x d_in) @ W (d_in x d_out), no rotations at all.

    Input: one ciphertext per input feature i, holding the column X[:, i]
    replicated G = N // T times (segment g = slots [g*T, (g+1)*T)).
    Output: one ciphertext per group of G output features: segment g of
    group J holds Y[:, J*G + g]. Each (i, J) costs one ct x pt with the
    plaintext "W[i, J*G+g] on segment g" and an addition: d_in * ceil(d_out/G)
    products, i.e. full slot utilization. When G == 1 (T > N/2) the plaintext
    is a scalar and SEAL multiplies by a monomial (much cheaper, tiny noise).

    Plaintexts depend on T; they are encoded on the fly unless their total
    size fits `cache_bytes`, in which case encode_weights keeps them (NTT form).
    """

    def __init__(self, d_in: int, d_out: int, T: int, params, cache_bytes: int = 512 << 20):
        if not 1 <= T <= params.slot_count:
            raise ValueError(f"T={T} must be in [1, {params.slot_count}] (split longer prompts)")
        self.d_in, self.d_out, self.T = d_in, d_out, T
        self.n_slots = params.slot_count
        self.G = self.n_slots // T
        self.n_groups = -(-d_out // self.G)
        pt_bytes = self.n_slots * 8 * (len(params.coeff_modulus) - 1)
        self.cache = self.G > 1 and d_in * self.n_groups * pt_bytes <= cache_bytes

    def pack_input(self, X_int) -> np.ndarray:
        X = np.asarray(X_int, dtype=np.int64)
        assert X.shape == (self.T, self.d_in), X.shape
        out = np.zeros((self.d_in, self.n_slots), dtype=np.int64)
        out[:, : self.G * self.T] = np.tile(X.T, (1, self.G))
        return out

    def unpack_output(self, slots) -> np.ndarray:
        slots = np.atleast_2d(np.asarray(slots))
        Y = np.zeros((self.T, self.n_groups * self.G), dtype=slots.dtype)
        for J in range(self.n_groups):
            seg = slots[J, : self.G * self.T].reshape(self.G, self.T)
            Y[:, J * self.G : (J + 1) * self.G] = seg.T
        return Y[:, : self.d_out]

    def galois_steps(self) -> set[int]:
        return set()

    def _plain(self, he, W, i, J):
        cols = W[i, J * self.G : (J + 1) * self.G]
        if not cols.any():
            return None
        if self.G == 1:
            # scalar plaintext: polynomial with one coefficient (hex string in SEAL)
            return sealapi.Plaintext(format(int(cols[0]) % he.p, "x"))
        return he.encode_ntt(np.repeat(cols, self.T))

    def encode_weights(self, he, W):
        W = np.asarray(W, dtype=np.int64)
        assert W.shape == (self.d_in, self.d_out)
        Wp = np.zeros((self.d_in, self.n_groups * self.G), dtype=np.int64)
        Wp[:, : self.d_out] = W
        cached = None
        if self.cache:
            cached = [[self._plain(he, Wp, i, J) for i in range(self.d_in)] for J in range(self.n_groups)]
        return {"W": Wp, "pts": cached}

    def apply(self, he, weights, cts) -> list:
        ev = he.evaluator
        W, cached = weights["W"], weights["pts"]
        ntt = self.G > 1
        xs = [he.to_ntt(c) for c in cts] if ntt else list(cts)
        outs = []
        for J in range(self.n_groups):
            acc = None
            for i in range(self.d_in):
                pt = cached[J][i] if cached is not None else self._plain(he, W, i, J)
                if pt is None:
                    continue
                prod = sealapi.Ciphertext()
                ev.multiply_plain(xs[i], pt, prod)
                if acc is None:
                    acc = prod
                else:
                    ev.add_inplace(acc, prod)
            if acc is None:  # all-zero weights: an encryption of zero
                acc = he.encrypt(np.zeros(1, dtype=np.int64))
                if ntt:
                    ev.transform_to_ntt_inplace(acc)
            if ntt:
                ev.transform_from_ntt_inplace(acc)
            outs.append(acc)
        return outs
