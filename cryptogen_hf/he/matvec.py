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
from collections import defaultdict

import numpy as np
import tenseal.sealapi as sealapi

from .diagonal import DEFAULT_COSTS, Region, WindowLayout, baby_giant_sum, best_n1, bsgs_cost, fold, fold_rotations


def matvec_plan(d_in: int, d_out: int, params, costs: dict | None = None, max_parts: int = 8):
    """The decode plan (one token per ciphertext) for x @ W with the lowest
    estimated time, conversions included: a MatvecPlan, or a SplitMatvecPlan
    of 2..max_parts input chunks. An input wider than a row must be split;
    one that fills a row nearly must too (a 4096-wide input in a 4096-slot
    row leaves room for 2 outputs per ciphertext: 182 s estimated for a
    4096 x 4096 product, 3.1 s in four chunks), and a wide output sometimes
    gains (Llama-3.2-1B's 2048 x 16384 gate|up: 5.9 s, 4.7 s in three)."""
    t = costs or DEFAULT_COSTS
    best = None
    for parts in range(1, max_parts + 1):
        if -(-d_in // parts) > params.row_size:
            continue
        plan = MatvecPlan(d_in, d_out, params, costs=costs) if parts == 1 else SplitMatvecPlan(d_in, d_out, params, parts, costs)
        seconds = plan.est_seconds + parts * t["to_he"] + plan.n_tiles * t["from_he"]
        if best is None or seconds < best[0]:
            best = (seconds, plan)
    return best[1]


class MatvecPlan:
    """Encrypted x (d_in) times plaintext W (d_in x d_out), ``tokens`` tokens per ciphertext.

    tokens = 1 (a decode step): x replicated periodically over both rows
    (slot s of a row holds x[s mod d_in]), all slots serving one token.
    tokens = 2m (a pass of many tokens): row r holds tokens r, r + 2, ...; each
    token owns a region of R // m slots with its x replicated in it, so one
    set of rotations and products serves all of them. The plaintext diagonals
    do not depend on the pass length, only on ``tokens``.

    Output: ``n_tiles`` ciphertexts per input ciphertext; y[j, o] of token j
    sits at one slot of one tile. The planner picks the chunking c (and
    BSGS n1) with the lowest estimated time per token; for tokens > 1 that
    estimate includes the two conversions around the product (an input
    ciphertext, n_tiles outputs), which packing divides among the tokens.
    """

    n_inputs = 1  # input ciphertexts per group of ``tokens`` tokens

    def __init__(self, d_in: int, d_out: int, params, tokens: int = 1, costs: dict | None = None, c: int | None = None, n1: int | None = None):
        self.d_in, self.d_out, self.tokens = d_in, d_out, tokens
        self.n_slots, self.row_size = params.slot_count, params.row_size
        R = self.row_size
        if d_in > R:
            raise ValueError(f"d_in={d_in} > row size {R}: split the input into chunks of <= {R}")
        if tokens != 1 and (tokens % 2 or not 2 <= tokens <= 2 * R // d_in):
            raise ValueError(f"tokens per ciphertext must be 1 or even, and at most {2 * R // d_in} for d_in={d_in}; got {tokens}")
        t = costs or DEFAULT_COSTS
        if tokens == 1:
            region = R
            regions = [Region(0, 0, R, 0), Region(1, 0, R, 0)]
        else:
            region = R // (tokens // 2)
            regions = [Region(j % 2, (j // 2) * region, region, j) for j in range(tokens)]
        regions_per_token = len(regions) // tokens
        best = None
        for cc in ([c] if c else range(1, min(d_in, 64) + 1)):
            K = -(-d_in // cc)
            per_region = len(WindowLayout.window_starts(region, cc, K))
            if per_region == 0:
                continue
            tiles = -(-d_out // (regions_per_token * per_region))
            nn1 = n1 or best_n1(K, tiles, t)
            cost = bsgs_cost(K, nn1, tiles, t) + tiles * fold_rotations(cc) * t["rot"]
            if tokens > 1:
                cost += t["to_he"] + tiles * t["from_he"]
            if best is None or cost < best[0]:
                best = (cost, cc, K, nn1, tiles, regions_per_token * per_region)
        if best is None:
            raise ValueError(f"no window layout fits d_in={d_in} in regions of {region} slots")
        self.est_seconds, self.c, self.K, self.n1, self.n_tiles, cap = best  # est_seconds: per ciphertext
        self.tiles = []
        for ti in range(self.n_tiles):
            lay = WindowLayout(self.n_slots, R, d_in, self.c, self.K, self.n1, regions)
            outputs = list(range(ti * cap, min(d_out, (ti + 1) * cap)))
            lay.assign_outputs({j: outputs for j in range(tokens)})
            self.tiles.append(lay)

    @property
    def n_plaintexts(self) -> int:
        """Diagonals to encode (an upper bound: all-zero ones are skipped)."""
        return self.n_tiles * self.K

    # -- client side ---------------------------------------------------------
    def pack_rows(self, X) -> np.ndarray:
        """Up to ``tokens`` rows of inputs (n x d_in ints) -> the N slots of one ciphertext."""
        X = np.asarray(X, dtype=np.int64).reshape(-1, self.d_in)
        if X.shape[0] > self.tokens:
            raise ValueError(f"{X.shape[0]} rows do not fit a ciphertext of {self.tokens} tokens")
        zero = np.zeros(self.d_in, dtype=np.int64)
        return self.tiles[0].pack_input([X[j] if j < X.shape[0] else zero for j in range(self.tokens)])

    def unpack_rows(self, slots) -> np.ndarray:
        """slots: (n_tiles, N) decrypted slot values (or masks) -> Y (tokens x d_out)."""
        slots = np.atleast_2d(np.asarray(slots))
        Y = np.zeros((self.tokens, self.d_out), dtype=slots.dtype)
        for ti, lay in enumerate(self.tiles):
            Y[lay.out_head, lay.out_index] = slots[ti, lay.out_slot]
        return Y

    def pack_input(self, x_int) -> np.ndarray:
        x = np.asarray(x_int, dtype=np.int64).reshape(-1)
        if x.size != self.d_in:
            raise ValueError(f"expected {self.d_in} inputs, got {x.size}")
        return self.pack_rows(x[None])

    def unpack_output(self, slots) -> np.ndarray:
        """The first token's outputs y (d_out,)."""
        return self.unpack_rows(slots)[0]

    # -- server side ---------------------------------------------------------
    def encode_weights(self, he, W) -> list:
        """Encode all diagonals once, in NTT form. W: int array (d_in, d_out), centred."""
        W = np.asarray(W, dtype=np.int64)
        assert W.shape == (self.d_in, self.d_out), W.shape
        enc = []
        self._nonzero = []
        for lay in self.tiles:
            D, nz = lay.diagonals(lambda h, o, i: W[i, o])  # the same W for every token
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

    def baby_steps(self, he, ct) -> list:
        """The n1 rotations of an input ciphertext, each moved to NTT form once."""
        return [he.to_ntt(ct if b == 0 else he.rotate_rows(ct, b)) for b in range(self.n1)]

    def giant_sum(self, he, baby, tile_weights, tile: int, giants=None):
        """Tile ``tile``'s sum over ``giants`` (default all) of its giant steps,
        before the fold; None if all their diagonals are zero."""
        ev = he.evaluator

        def multiply_plain(ct, pt):
            prod = sealapi.Ciphertext()
            ev.multiply_plain(ct, pt, prod)
            return prod

        def leave_ntt(acc):
            ev.transform_from_ntt_inplace(acc)  # rotations need coefficient form
            return acc

        return baby_giant_sum(he, baby, self.n1, self.tiles[tile].n2, lambda g, b: tile_weights[g][b], multiply_plain, leave_ntt, giants)

    def fold_tile(self, he, total):
        return fold(he, total, self.c, self.K)

    def apply(self, he, weights, ct) -> list:
        """Encrypted x (packed by pack_input) -> list of n_tiles output ciphertexts."""
        return MatvecWork.for_pass(self, 1).run(he, [weights], [ct])

    def apply_all(self, he, weights, cts) -> list:
        """Every input ciphertext of a pass -> n_tiles outputs each, in order."""
        return MatvecWork.for_pass(self, len(cts)).run(he, [weights], cts)

    def estimate_budget(self, model, b_in: float) -> float:
        b = model.after_rotate(b_in)  # baby rotation
        b = model.after_mul_plain(b)
        b = model.sum_of(b, self.K)
        b = model.after_rotate(b)  # giant rotation
        return model.after_rotate(b, fold_rotations(self.c)) - math.log2(max(self.c, 1))


class SplitMatvecPlan:
    """x @ W with x cut into ``n_parts`` equal chunks (an input wider than a
    row, e.g. a LLaMA MLP's down projection of 8192 inputs, or one that a
    single plan serves badly: ``matvec_plan``), each a MatvecPlan of the same
    shape in its own input ciphertext; the parts' output tiles are added
    (their outputs sit in the same slots). The interface is MatvecPlan's,
    with ``n_inputs`` ciphertexts per token."""

    tokens = 1

    def __init__(self, d_in: int, d_out: int, params, n_parts: int, costs: dict | None = None):
        self.d_in, self.d_out, self.n_inputs = d_in, d_out, n_parts
        self.part = MatvecPlan(-(-d_in // n_parts), d_out, params, costs=costs)
        self.n_tiles = self.part.n_tiles
        self.est_seconds = self.n_inputs * self.part.est_seconds

    @property
    def n_plaintexts(self) -> int:
        return self.n_inputs * self.part.n_plaintexts

    def _pad_rows(self, X) -> np.ndarray:
        """X (n x d_in) zero-padded to n_inputs equal chunks of columns: (n_inputs, n, part d_in)."""
        X = np.asarray(X, dtype=np.int64).reshape(-1, self.d_in)
        padded = np.zeros((X.shape[0], self.n_inputs * self.part.d_in), dtype=np.int64)
        padded[:, : self.d_in] = X
        return padded.reshape(X.shape[0], self.n_inputs, self.part.d_in).transpose(1, 0, 2)

    def pack_rows(self, X) -> np.ndarray:
        """One row -> (n_inputs, N) slot vectors, one ciphertext each."""
        return np.stack([self.part.pack_rows(chunk) for chunk in self._pad_rows(X)])

    def unpack_rows(self, slots) -> np.ndarray:
        return self.part.unpack_rows(slots)

    def encode_weights(self, he, W) -> list:
        W = np.asarray(W, dtype=np.int64)
        padded = np.zeros((self.n_inputs * self.part.d_in, self.d_out), dtype=np.int64)
        padded[: self.d_in] = W
        return [self.part.encode_weights(he, padded[i * self.part.d_in : (i + 1) * self.part.d_in]) for i in range(self.n_inputs)]

    def galois_steps(self) -> set[int]:
        return self.part.galois_steps()

    def apply_all(self, he, weights, cts) -> list:
        return MatvecWork.for_pass(self, len(cts)).run(he, weights, cts)

    def estimate_budget(self, model, b_in: float) -> float:
        return model.sum_of(self.part.estimate_budget(model, b_in), self.n_inputs)


class MatvecWork:
    """The work of a plaintext-weight product over one or more input
    ciphertexts, as a list of items that any split of adds up.

    Each output ciphertext (output group ``out``, tile ``tile``) is the fold of
    a sum, over the terms that feed the group (an input ciphertext and the
    weights it meets) and the tile's giant steps, of one BSGS block
    (``baby_giant_sum``). Folding is linear, so the items can be cut into
    shards, summed apart (``partial_sums``, in a process of its own each) and
    the partial sums added and folded once (``combine``): the server's HE
    workers split a product this way (server/he_workers.py). ``run`` does all
    of it in one process, which is what ``apply_all`` is.

    Covers a pass of a MatvecPlan (a term per input ciphertext), of a
    SplitMatvecPlan (``n_inputs`` terms per output group, one per part) and
    the token embedding (a term per vocabulary chunk and token).
    """

    def __init__(self, plan: MatvecPlan, terms: list[tuple[int, int, int]], n_outputs: int):
        self.plan = plan  # the MatvecPlan every term uses
        self.terms = terms  # (input ciphertext, weight set, output group)
        self.n_outputs = n_outputs
        self.items = [(k, tile, g) for k in range(len(terms)) for tile, lay in enumerate(plan.tiles) for g in range(lay.n2)]

    @classmethod
    def for_pass(cls, plan, n_cts: int) -> "MatvecWork":
        """A pass's n_cts input ciphertexts through ``plan`` (weight set 0, or
        part i's for a SplitMatvecPlan)."""
        parts = plan.n_inputs
        if n_cts % parts:
            raise ValueError(f"{n_cts} input ciphertexts do not split into groups of {parts}")
        base = plan.part if isinstance(plan, SplitMatvecPlan) else plan
        return cls(base, [(i, i % parts, i // parts) for i in range(n_cts)], n_cts // parts)

    @classmethod
    def for_embedding(cls, plan: MatvecPlan, n_chunks: int, per_chunk: int) -> "MatvecWork":
        """One-hot rows in n_chunks vocabulary chunks of per_chunk ciphertexts
        each (chunk c's j-th is input c * per_chunk + j): the outputs of all
        chunks add up, chunk c meets weight set c."""
        return cls(plan, [(c * per_chunk + j, c, j) for c in range(n_chunks) for j in range(per_chunk)], per_chunk)

    def shard(self, index: int, n_shards: int) -> range:
        """Shard ``index`` of ``n_shards``: a contiguous run of items, sizes within one."""
        n = len(self.items)
        return range(index * n // n_shards, (index + 1) * n // n_shards)

    def inputs_of(self, items: range) -> list[int]:
        """The input ciphertexts a shard reads."""
        return sorted({self.terms[self.items[i][0]][0] for i in items})

    def partial_sums(self, he, weight_sets: list, cts: dict, items: range) -> dict:
        """{(output group, tile): unfolded partial sum} over ``items``; ``cts``
        maps input index -> ciphertext (at least ``inputs_of(items)``)."""
        by_term = defaultdict(lambda: defaultdict(list))  # term -> tile -> giant steps
        for i in items:
            k, tile, g = self.items[i]
            by_term[k][tile].append(g)
        sums = {}
        for k, tiles in by_term.items():
            ct_index, weight_set, out = self.terms[k]
            baby = self.plan.baby_steps(he, cts[ct_index])
            for tile, giants in tiles.items():
                part = self.plan.giant_sum(he, baby, weight_sets[weight_set][tile], tile, giants)
                if part is not None:
                    _accumulate(he, sums, (out, tile), part)
        return sums

    def combine(self, he, partials: list[dict]) -> list:
        """Add the shards' partial sums and fold: n_tiles outputs per output group, in order."""
        total = {}
        for sums in partials:
            for key, ct in sums.items():
                _accumulate(he, total, key, ct)
        outs = []
        for out in range(self.n_outputs):
            for tile in range(self.plan.n_tiles):
                if (out, tile) not in total:
                    raise ValueError(f"output {out} tile {tile}: every weight diagonal it reads is zero")
                outs.append(self.plan.fold_tile(he, total[(out, tile)]))
        return outs

    def run(self, he, weight_sets: list, cts: list) -> list:
        """The whole product in this process."""
        everything = range(len(self.items))
        return self.combine(he, [self.partial_sums(he, weight_sets, dict(enumerate(cts)), everything)])


def _accumulate(he, sums: dict, key, ct):
    if key in sums:
        he.evaluator.add_inplace(sums[key], ct)
    else:
        sums[key] = ct
