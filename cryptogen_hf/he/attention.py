"""Attention against the encrypted KV cache (ct x ct), two layouts.

OUTER layout (prefill tokens, written once): per attention head a region of
L slots in one row; the cache is stored as generalized *diagonals* of K (and
of V), one ciphertext per diagonal k < d_head, pre-rotated for BSGS, so that

  scores[h, t] = sum_j q[h, j] K[t, h, j]   (per head: K_h (T x d_head) @ q_h)
  out[h, j]    = sum_t p[h, t] V[t, h, j]   (per head: V_h^T (d_head x T) @ p_h)

are both the diagonal product of diagonal.py with the *client's fresh*
query / probability ciphertext as the rotated input: d_head ct x ct products,
one relinearization per giant step and ~2*sqrt(d_head) (+ log2(T/d_head) for
out) rotations, independent of T. The client sends ONE query ciphertext and
ONE probability ciphertext per step. (DESIGN section 5 speaks of "a ciphertext
per feature column"; a diagonal is the same number of ciphertexts, and it
avoids both replicating q per column and reducing over tokens inside slots.)

INNER layout (generated tokens, appended one at a time): B = 2*floor(R/d)
tokens per ciphertext (d = n_heads*d_head), token r of a block at slot
row*R + (r mod Bh)*d (row = r // Bh, Bh = B/2) so that no token straddles
the two rows. Appending = adding the client's fresh ciphertext that holds k
at that offset (zeros elsewhere); a new ciphertext every B tokens.
  scores: one query ct (q replicated at the B offsets) x each K block, relin,
          then a fold over d_head slots (log2(d_head) rotations per block).
  out:    the client sends one probability ct per block (p[h,t] repeated
          over j), sum_b P_b x V_b, one relin, fold over the Bh tokens of a
          row (stride d) and add the two rows (column rotation).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import tenseal.sealapi as sealapi

from .diagonal import Region, WindowLayout, baby_giant_sum, fold, fold_rotations, fold_steps
from .flooding import RESULT_STATISTICAL_BITS


def _encrypted_diagonal_sum(he, lay: WindowLayout, diag_cts, ct_in, giants=None):
    """sum_k rot(u, k) * D_k with encrypted (pre-rotated) diagonals, over the
    diagonals of ``giants`` (default all), before the fold; None if all of
    them are zero. Sums over disjoint giant steps add up exactly to the whole."""
    ev = he.evaluator
    baby = [ct_in if b == 0 else he.rotate_rows(ct_in, b) for b in range(lay.n1)]

    def multiply(ct, diag_ct):
        prod = sealapi.Ciphertext()
        ev.multiply(ct, diag_ct, prod)
        return prod

    def relinearize(acc):
        # one relinearization per giant step (rotation needs a size-2 ciphertext)
        ev.relinearize_inplace(acc, he.relin_keys)
        return acc

    return baby_giant_sum(he, baby, lay.n1, lay.n2, lambda g, b: diag_cts[g][b], multiply, relinearize, giants)


# Versions of cache ciphertexts, unique over all caches of the process: a copy
# of a block elsewhere (an HE worker's, server/he_workers.py) is stale when its
# version is not the cache's.
_CACHE_VERSIONS = itertools.count()


class OuterAttentionPlan:
    """Shape-only plan for the outer (prefill) part of the cache: H heads, d_head, T tokens."""

    def __init__(self, n_heads: int, d_head: int, T: int, params, n1: int | None = None):
        self.H, self.dh, self.T = n_heads, d_head, T
        self.n_slots, R = params.slot_count, params.row_size
        self.c_out = -(-T // d_head)
        L = self.c_out * d_head + d_head - 1  # fits both the score and the output windows
        per_row = R // L
        if 2 * per_row < n_heads:
            raise ValueError(
                f"outer layout: {n_heads} heads x {L} slots do not fit in 2 rows of {R}; "
                f"use at most {self._max_T(n_heads, d_head, R)} tokens per outer tile"
            )
        regions = [Region(h // per_row, (h % per_row) * L, L, h) for h in range(n_heads)]
        n1 = n1 or self.default_n1(d_head)
        self.scores_layout = WindowLayout(self.n_slots, R, d_head, 1, d_head, n1, regions)
        self.scores_layout.assign_outputs({h: list(range(T)) for h in range(n_heads)})
        self.out_layout = WindowLayout(self.n_slots, R, T, self.c_out, d_head, n1, regions)
        self.out_layout.assign_outputs({h: list(range(d_head)) for h in range(n_heads)})

    @staticmethod
    def _max_T(H, dh, R):
        per_row = -(-H // 2)
        return ((R // per_row - dh + 1) // dh) * dh

    @classmethod
    def max_tokens(cls, n_heads: int, d_head: int, params) -> int:
        """The most tokens one outer tile holds (all heads in the two rows)."""
        return max(0, cls._max_T(n_heads, d_head, params.row_size))

    @staticmethod
    def default_n1(d_head: int) -> int:
        return max(1, 2 ** round(math.log2(math.sqrt(d_head))))

    @classmethod
    def galois_steps_up_to(cls, n_heads: int, d_head: int, max_T: int, params) -> set[int]:
        """Rotation steps of every plan with T <= max_T (the keys are made before T is known).

        Baby and giant steps depend on d_head only; the output fold on
        ceil(T / d_head), so the union over T is small (a few multiples of d_head).
        """
        n1 = cls.default_n1(d_head)
        n2 = -(-d_head // n1)
        steps = set(range(1, n1)) | {g * n1 for g in range(1, n2)}
        for c_out in range(1, -(-max_T // d_head) + 1):
            steps |= set(fold_steps(c_out, d_head))
        return steps

    # -- client side -----------------------------------------------------------
    def pack_keys(self, K) -> tuple[np.ndarray, np.ndarray]:
        """K: (T, H, d_head) ints -> (diagonal slot arrays (n2, n1, N), nonzero mask)."""
        K = np.asarray(K, dtype=np.int64)
        return self.scores_layout.diagonals(lambda h, t, j: K[t, h, j])

    def pack_values(self, V):
        V = np.asarray(V, dtype=np.int64)
        return self.out_layout.diagonals(lambda h, j, t: V[t, h, j])

    def key_value_nonzero(self) -> tuple[np.ndarray, np.ndarray]:
        """Which (giant, baby) diagonals of K and of V can be nonzero: a property of
        the shape alone, so both parties agree on which ciphertexts are sent."""
        if not hasattr(self, "_nonzero"):
            ones = lambda h, o, i: np.ones(len(h), dtype=np.int64)  # noqa: E731
            self._nonzero = (self.scores_layout.diagonals(ones)[1], self.out_layout.diagonals(ones)[1])
        return self._nonzero

    def pack_query(self, q) -> np.ndarray:
        q = np.asarray(q, dtype=np.int64).reshape(self.H, self.dh)
        return self.scores_layout.pack_input({h: q[h] for h in range(self.H)})

    def pack_probs(self, p) -> np.ndarray:
        p = np.asarray(p, dtype=np.int64).reshape(self.H, self.T)
        return self.out_layout.pack_input({h: p[h] for h in range(self.H)})

    @staticmethod
    def _gather(lay, slots, width: int, n_heads: int) -> np.ndarray:
        """(heads x width) values from the output slots a WindowLayout assigned."""
        slots = np.asarray(slots).reshape(-1)
        out = np.zeros((n_heads, width), dtype=slots.dtype)
        out[lay.out_head, lay.out_index] = slots[lay.out_slot]
        return out

    def unpack_scores(self, slots) -> np.ndarray:
        return self._gather(self.scores_layout, slots, self.T, self.H)

    def unpack_out(self, slots) -> np.ndarray:
        return self._gather(self.out_layout, slots, self.dh, self.H)

    def galois_steps(self) -> set[int]:
        steps = set()
        for lay in (self.scores_layout, self.out_layout):
            steps |= set(range(1, lay.n1)) | {g * lay.n1 for g in range(1, lay.n2)} | set(lay.fold_steps())
        return steps

    # -- server side -----------------------------------------------------------
    def layout(self, which: str) -> WindowLayout:
        """"scores" (q against the key diagonals) or "attend" (p against the value diagonals)."""
        return self.scores_layout if which == "scores" else self.out_layout

    @staticmethod
    def diagonals(cache: "OuterKVCache", which: str) -> list:
        return cache.k_diag if which == "scores" else cache.v_diag

    def partial(self, he, cache: "OuterKVCache", which: str, ct, giants=None):
        """``which``'s product over the diagonals of ``giants`` (default all),
        unfolded: partial sums over disjoint giant steps add up
        (``finish``), which is how the product is split over processes
        (server/he_workers.py)."""
        return _encrypted_diagonal_sum(he, self.layout(which), self.diagonals(cache, which), ct, giants)

    def finish(self, he, which: str, partials):
        partials = [p for p in partials if p is not None]
        total = partials[0]
        for p in partials[1:]:
            he.evaluator.add_inplace(total, p)
        lay = self.layout(which)
        return fold(he, total, lay.c, lay.K)

    def scores(self, he, cache: "OuterKVCache", q_ct):
        return self.finish(he, "scores", [self.partial(he, cache, "scores", q_ct)])

    def attend(self, he, cache: "OuterKVCache", p_ct):
        return self.finish(he, "attend", [self.partial(he, cache, "attend", p_ct)])

    def estimate_budget(self, model, b_cache: float, which: str = "scores") -> float:
        lay = self.scores_layout if which == "scores" else self.out_layout
        b_in = model.after_rotate(model.fresh)
        b = model.after_mul(b_in, b_cache)
        b = model.sum_of(b, lay.n1)
        b = model.after_relin(b)
        b = model.after_rotate(b)
        b = model.sum_of(b, lay.n2)
        return model.after_rotate(b, fold_rotations(lay.c)) - math.log2(max(lay.c, 1))


class OuterKVCache:
    """Server-side container: encrypted K and V diagonals of the prefill tokens."""

    def __init__(self, plan: OuterAttentionPlan, k_diag, v_diag, fresh_budget: float):
        self.plan = plan
        self.k_diag, self.v_diag = k_diag, v_diag  # (n2 x n1) nested lists of Ciphertext | None
        self.version = next(_CACHE_VERSIONS)  # its ciphertexts never change: copies elsewhere match it
        self.n_tokens = plan.T
        self.est_budget = {id(c): fresh_budget for row in k_diag + v_diag for c in row if c is not None}

    def _cts(self):
        return [c for row in self.k_diag + self.v_diag for c in row if c is not None]

    @property
    def nbytes(self) -> int:
        return sum(c.size() * c.coeff_modulus_size() * c.poly_modulus_degree() * 8 for c in self._cts())

    def min_budget(self) -> float:
        return min(self.est_budget.values())

    def needs_refresh(self, threshold_bits: float) -> bool:
        return self.min_budget() < threshold_bits


class InnerKVCache:
    """Server-side container for generated tokens, B tokens per ciphertext.

    Estimated noise budget per ciphertext: the sum of k fresh encryptions has
    at most k times the noise, i.e. budget >= fresh - log2(k); a plaintext
    0/1 mask multiply (server-side tokens) costs a ct x pt on top.
    """

    def __init__(self, n_heads: int, d_head: int, params, noise_model=None):
        self.H, self.dh = n_heads, d_head
        self.d = n_heads * d_head
        self.n_slots, self.R = params.slot_count, params.row_size
        self.Bh = self.R // self.d
        if self.Bh < 1:
            raise ValueError(f"inner layout needs d={self.d} <= row size {self.R}")
        self.B = 2 * self.Bh
        self.model = noise_model
        self.k_cts, self.v_cts = [], []
        self.versions = []  # per block, changed whenever its ciphertexts do (_CACHE_VERSIONS)
        self.est_budget = []  # per block: estimated budget of the weaker of (K, V)
        self._worst_add = []  # per block: budget of the weakest addend
        self._n_addends = []
        self.n_tokens = 0

    # -- layout (client and server) ------------------------------------------
    def slot_offset(self, t: int) -> int:
        r = t % self.B
        return (r // self.Bh) * self.R + (r % self.Bh) * self.d

    def pack_token(self, vec, t: int) -> np.ndarray:
        """The client's fresh slots for token t's k (or v): d features at slot_offset(t)."""
        out = np.zeros(self.n_slots, dtype=np.int64)
        o = self.slot_offset(t)
        out[o : o + self.d] = np.asarray(vec, dtype=np.int64).reshape(-1)
        return out

    def pack_query(self, q) -> np.ndarray:
        q = np.asarray(q, dtype=np.int64).reshape(-1)
        out = np.zeros(self.n_slots, dtype=np.int64)
        for r in range(self.B):
            o = self.slot_offset(r)
            out[o : o + self.d] = q
        return out

    def pack_probs(self, p, n_tokens: int | None = None) -> np.ndarray:
        """p: (H, T_inner) -> one slot array per block: p[h, t] repeated over the d_head features."""
        p = np.asarray(p, dtype=np.int64)
        T = p.shape[1] if n_tokens is None else n_tokens
        nb = -(-T // self.B)
        out = np.zeros((nb, self.n_slots), dtype=np.int64)
        for t in range(T):
            o = self.slot_offset(t)
            out[t // self.B, o : o + self.d] = np.repeat(p[:, t], self.dh)
        return out

    def unpack_scores(self, slots_per_block, n_tokens: int | None = None) -> np.ndarray:
        T = self.n_tokens if n_tokens is None else n_tokens
        s = np.zeros((self.H, T), dtype=np.asarray(slots_per_block[0]).dtype)
        for t in range(T):
            o = self.slot_offset(t)
            s[:, t] = np.asarray(slots_per_block[t // self.B])[o + np.arange(self.H) * self.dh]
        return s

    def unpack_out(self, slots) -> np.ndarray:
        return np.asarray(slots)[: self.d].reshape(self.H, self.dh)

    def galois_steps(self) -> set[int]:
        steps = set(fold_steps(self.dh, 1)) | set(fold_steps(self.Bh, self.d))
        steps.add(0)  # column rotation: add the two rows
        return steps

    # -- appends (server) ---------------------------------------------------------
    def _add_to_block(self, he, k_ct, v_ct, addend_budget):
        t = self.n_tokens
        if t % self.B == 0:
            self.k_cts.append(k_ct)
            self.v_cts.append(v_ct)
            self._n_addends.append(1)
            self._worst_add.append(addend_budget)
            self.versions.append(next(_CACHE_VERSIONS))
        else:
            he.evaluator.add_inplace(self.k_cts[-1], k_ct)
            he.evaluator.add_inplace(self.v_cts[-1], v_ct)
            self._n_addends[-1] += 1
            self._worst_add[-1] = min(self._worst_add[-1], addend_budget)
            self.versions[-1] = next(_CACHE_VERSIONS)
        b = self._worst_add[-1] - math.log2(self._n_addends[-1])
        if len(self.est_budget) < len(self.k_cts):
            self.est_budget.append(b)
        else:
            self.est_budget[-1] = b
        self.n_tokens += 1

    def append(self, he, k_ct, v_ct):
        """Fresh client ciphertexts already placed at slot_offset(n_tokens), zeros elsewhere."""
        self._add_to_block(he, k_ct, v_ct, self.model.fresh)

    def append_masked(self, he, k_ct, v_ct, b_in: float | None = None):
        """Token computed at the server: k/v at slot_offset(t) but other slots arbitrary.

        Multiply by a plaintext 0/1 mask of the token's slot range, then add.
        """
        o = self.slot_offset(self.n_tokens)
        mask = np.zeros(self.n_slots, dtype=np.int64)
        mask[o : o + self.d] = 1
        pt = he.encode(mask)
        ks, vs = sealapi.Ciphertext(), sealapi.Ciphertext()
        he.evaluator.multiply_plain(k_ct, pt, ks)
        he.evaluator.multiply_plain(v_ct, pt, vs)
        b = self.model.after_mul_plain(self.model.fresh if b_in is None else b_in)
        self._add_to_block(he, ks, vs, b)

    def load_blocks(self, k_cts: list, v_cts: list, n_tokens: int):
        """Take whole blocks of fresh client ciphertexts (B tokens each, the last
        one possibly partial) as the cache's content (benchmark set-up)."""
        if self.n_tokens or len(k_cts) != -(-n_tokens // self.B) or len(v_cts) != len(k_cts):
            raise ValueError(f"{len(k_cts)} blocks cannot hold {n_tokens} tokens in an empty cache")
        self.k_cts, self.v_cts = list(k_cts), list(v_cts)
        self._n_addends = [1] * len(k_cts)
        self._worst_add = [self.model.fresh] * len(k_cts)
        self.est_budget = list(self._worst_add)
        self.versions = [next(_CACHE_VERSIONS) for _ in k_cts]
        self.n_tokens = n_tokens

    def token_slots(self, t: int) -> np.ndarray:
        """Slot indices holding token t's d features in its block's ciphertext."""
        o = self.slot_offset(t)
        return np.arange(o, o + self.d)

    def blocks_needing_refresh(self, margin_bits: float = RESULT_STATISTICAL_BITS + 1) -> list[int]:
        """Blocks whose estimated budget would fall below ``margin_bits`` in the
        next attention kernels. The default keeps every attention result the
        client decrypts at 41 bits or more, so that its flooding hides the
        result's noise up to 2**-40 per coefficient (he/flooding.py)."""
        weak = []
        for i, b in enumerate(self.est_budget):
            after = min(self._kernel_budget(b, "scores"), self._kernel_budget(b, "values"))
            if after < margin_bits:
                weak.append(i)
        return weak

    def truncate(self, n_tokens: int):
        """Forget tokens >= n_tokens: drop whole blocks past them (the caller has
        already zeroed the dropped tokens' slots of the last kept block)."""
        if not 0 <= n_tokens <= self.n_tokens:
            raise ValueError(f"cannot truncate a cache of {self.n_tokens} tokens to {n_tokens}")
        keep_blocks = -(-n_tokens // self.B)
        for lst in (self.k_cts, self.v_cts, self.est_budget, self._worst_add, self._n_addends, self.versions):
            del lst[keep_blocks:]
        self.n_tokens = n_tokens

    def replace_block(self, i: int, k_ct, v_ct):
        """After a client-side refresh (mask, decrypt, re-encrypt, unmask)."""
        self.k_cts[i], self.v_cts[i] = k_ct, v_ct
        self.versions[i] = next(_CACHE_VERSIONS)
        self._n_addends[i] = 1
        self._worst_add[i] = self.model.fresh - 1  # unmask = one plaintext subtraction
        self.est_budget[i] = self._worst_add[i]

    @property
    def nbytes(self) -> int:
        return sum(c.size() * c.coeff_modulus_size() * c.poly_modulus_degree() * 8 for c in self.k_cts + self.v_cts)

    def needs_refresh(self, threshold_bits: float) -> bool:
        return any(b < threshold_bits for b in self.est_budget)

    # -- kernels (server) ---------------------------------------------------------
    def scores(self, he, q_ct, blocks=None) -> list:
        """One output ciphertext per block (default all; else the listed ones):
        score (h, t) at slot_offset(t) + h*d_head."""
        outs = []
        for i in range(len(self.k_cts)) if blocks is None else blocks:
            m = sealapi.Ciphertext()
            he.evaluator.multiply(q_ct, self.k_cts[i], m)
            he.evaluator.relinearize_inplace(m, he.relin_keys)
            outs.append(fold(he, m, self.dh, 1))
        return outs

    def attend(self, he, p_cts):
        """sum_t p[h,t] V[t,h,:] -> one ciphertext, (h, j) at slot h*d_head + j of row 0."""
        blocks = range(min(len(p_cts), len(self.v_cts)))
        return self.attend_finish(he, [self.attend_partial(he, p_cts, blocks)])

    def attend_partial(self, he, p_cts, blocks):
        """The sum over ``blocks`` of p_cts[j] * V[blocks[j]] (three
        polynomials: not yet relinearized; None for no blocks). Partial sums
        over disjoint blocks add up (``attend_finish``), to exactly the one
        sum: how the blocks are split over processes (server/he_workers.py)."""
        ev = he.evaluator
        acc = None
        for p, i in zip(p_cts, blocks):
            m = sealapi.Ciphertext()
            ev.multiply(p, self.v_cts[i], m)
            if acc is None:
                acc = m
            else:
                ev.add_inplace(acc, m)
        return acc

    def attend_finish(self, he, partials):
        ev = he.evaluator
        partials = [p for p in partials if p is not None]
        acc = partials[0]
        for p in partials[1:]:
            ev.add_inplace(acc, p)
        ev.relinearize_inplace(acc, he.relin_keys)
        acc = fold(he, acc, self.Bh, self.d)
        ev.add_inplace(acc, he.rotate_columns(acc))
        return acc

    def estimate_budget(self, which: str = "scores") -> float:
        return self._kernel_budget(min(self.est_budget), which)

    def _kernel_budget(self, block_budget: float, which: str) -> float:
        return self._composed_kernel_budget(block_budget, which) + self.model.attention_slack

    def _composed_kernel_budget(self, block_budget: float, which: str) -> float:
        """The per-op rules of NoiseModel, composed: a worst-case bound."""
        m = self.model
        b = m.after_mul(m.fresh, block_budget)
        if which == "scores":
            b = m.after_relin(b)
            return m.after_rotate(b, fold_rotations(self.dh)) - math.log2(self.dh)
        b = m.sum_of(b, len(self.v_cts))
        b = m.after_relin(b)
        return m.after_rotate(b, fold_rotations(self.Bh) + 1) - math.log2(self.B)


def calibrate_attention_slack(client, n_heads: int, d_head: int, galois_steps=None) -> float:
    """Client side, at session set-up: how many bits the composed estimate of
    the decode attention kernels undershoots their real budget, less the
    noise model's margin. Measured on one full block of fresh encryptions of
    uniform values mod p (the worst case for ct x ct noise), with the
    client's own keys; the server then adds it to its estimates
    (``NoiseModel.attention_slack``), so that it refreshes a cache block when
    the results would really drop below 41 bits (he/flooding.py), not ~15
    bits earlier. Semi-honest: the server takes the client's measurement, as
    it takes the fresh budget. ``galois_steps``: the session's (a superset
    of the kernel's), made here once and reused by ``public_bundle``."""
    from .keys import ServerHE

    model = client.noise_model
    cache = InnerKVCache(n_heads, d_head, client.params, model)
    steps = sorted({int(s) for s in (cache.galois_steps() if galois_steps is None else galois_steps)})
    if tuple(steps) != client._galois_steps:
        client.make_galois_keys(steps)
    # The client's own evaluation keys, in process: nothing leaves it.
    server = ServerHE(client.params, client.public_key, client.relin_keys, client.galois_keys, steps, model)
    p = client.p
    rng = np.random.default_rng()  # operand values only: the measurement, not a secret
    for t in range(cache.B):
        slots = cache.pack_token(rng.integers(0, p, cache.d, dtype=np.uint64).astype(np.int64), t)
        cache.append(server, client.encrypt(slots), client.encrypt(slots))
    query = client.encrypt(cache.pack_query(rng.integers(0, p, cache.d, dtype=np.uint64).astype(np.int64)))
    probs = [client.encrypt(v) for v in cache.pack_probs(rng.integers(0, p, (n_heads, cache.B), dtype=np.uint64).astype(np.int64))]
    measured = {
        "scores": min(client.noise_budget(c) for c in cache.scores(server, query)),
        "values": client.noise_budget(cache.attend(server, probs)),
    }
    slack = min(measured[w] - cache._composed_kernel_budget(cache.est_budget[0], w) for w in measured)
    return max(0.0, slack - model.margin)
