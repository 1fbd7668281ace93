"""The secure decoder: a pass of new tokens against the encrypted KV cache.

SPMD, like CrypTen: the server and the client run ``SecureDecoder.step`` in
lockstep with their own ``Party``. The server holds ``EncodedDecoder`` (its
quantised, pre-encoded weights) and the encrypted caches; the client holds
the token ids and only public shapes. Between layers the activations are
CrypTen shares (16 fractional bits); every linear layer and both attention
products run under BFV at the server (DESIGN sections 4-5).

This module holds the generic secure layers, each a method of
``SecureDecoder`` a family's block calls:

    embed      the client encrypts one-hot rows; the server multiplies them
               with wte (ct x pt) and adds learned positions if the family has them
    norm       LayerNorm or RMSNorm (MPC); the affine is folded into the next linear
    linear     x W + b under HE (shares -> ciphertexts -> shares)
    attention  causal attention of the pass's queries over the encrypted cache,
               which their keys and values join (ct x ct products; or, for a
               conversation's first pass, on shares: see below)
    residual   additions of shares, free

and the wiring of a family's block (norms, linears, activation, position
scheme, in the order of its HF modeling file) lives in
``cryptogen_hf/families/<family>.py``. A step runs: embed, the family's block
per layer, the final norm, the LM head for the positions that need logits.

Cost per new token is linear in the context: the cache is never recomputed.

A pass of many tokens (a prompt) packs them: several tokens per ciphertext
in the blocks' linear layers (``DecoderPlans.for_pass``), and in a
conversation's first pass the prompt's own causal attention runs on shares
with plaintext-ciphertext products only (``protocol/shared_matmul.py``),
while its keys and values go into the encrypted cache as whole blocks.

Fixed point: activations enter HE with ``activation_bits`` fractional bits,
weights carry ``weight_bits``; a product has the sum, and the HE -> shares
conversion rescales to CrypTen's 16.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..crypten_compat import import_crypten
from ..families import ModelShape, family
from ..he import InnerKVCache, MatvecPlan, OuterAttentionPlan, OuterKVCache
from ..he.columns import ColumnProductPlan
from ..he.diagonal import DEFAULT_COSTS, fold_rotations
from ..he.matvec import matvec_plan
from ..mpc import ops
from ..mpc.runtime import CLIENT, SERVER, rank_of
from .convert import CRYPTEN_FRAC_BITS, he_to_shares, shares_to_he
from .layouts import (
    AttentionOutput,
    MatvecIO,
    OuterPart,
    ProbsIntoCache,
    PromptKVIntoCache,
    QKVIntoCache,
    ScoresFromCache,
    pack_outer_kv,
    unpack_outer_kv,
)
from .randomness import uniform_mod
from .shared_matmul import shared_matmul
from .wire import pack_blobs, unpack_blobs
from ..server.he_workers import HEWorkers

PROTOCOL_VERSION = "cryptogen-decoder/2"


@dataclass
class FixedPoint:
    activation_bits: int = 12
    weight_bits: int = 14

    def quantize_weight(self, w: torch.Tensor) -> np.ndarray:
        return torch.round(w.double() * 2.0**self.weight_bits).to(torch.int64).numpy()

    def quantize_product(self, b: torch.Tensor) -> np.ndarray:
        """A bias at the scale of (activation x weight) products."""
        return torch.round(b.double() * 2.0 ** (self.activation_bits + self.weight_bits)).to(torch.int64).numpy()


# Tokens per ciphertext a packed pass may use (MatvecPlan(tokens=...)). Every
# linear of the blocks may be packed (if its input fits a row); the LM head
# never is: a pass needs the logits of few positions (the last, or a
# speculative check's few). Nor is the embedding: packing its long one-hot
# rows gains little (1.4x estimated for the shipped GPT-2, ~5 % of a prompt's
# time) and its rotations would add 18 Galois keys (25 MiB) to every
# session's key bundle.
PACKED_TOKENS = (2, 4, 8, 16, 32)


def packed_plan(d_in: int, d_out: int, he_params, costs: dict | None = None) -> MatvecPlan | None:
    """The many-tokens-per-ciphertext plan with the lowest estimated time per token
    (None when no packing fits d_in)."""
    plans = [MatvecPlan(d_in, d_out, he_params, tokens=m, costs=costs) for m in PACKED_TOKENS if m <= 2 * he_params.row_size // d_in]
    return min(plans, key=lambda plan: plan.est_seconds / plan.tokens, default=None)


def pass_seconds(plan: MatvecPlan, T: int, costs: dict | None = None, pre_encoded: bool = False) -> float:
    """Estimated time of a pass of T tokens through ``plan``: products and
    conversions per ciphertext, plus, for a packed plan not ``pre_encoded``,
    encoding its diagonals on the fly (a decode plan's are encoded once, at load)."""
    t = costs or DEFAULT_COSTS
    if plan.tokens == 1:
        return T * (plan.est_seconds + plan.n_inputs * t["to_he"] + plan.n_tiles * t["from_he"])
    return -(-T // plan.tokens) * plan.est_seconds + (0.0 if pre_encoded else plan.n_plaintexts * t["encode"])


# A speculative check (generate(assistant_model=...) or prompt lookup) runs a
# few tokens per pass: the drafted ones and the last accepted one. Their
# linears are cheapest packed VERIFY_TOKENS per ciphertext, but encoding a
# packed plan's diagonals for every pass would cost more than packing saves,
# so a model whose verify plans fit VERIFY_WEIGHTS_MIB keeps their weights
# encoded from load (the shipped GPT-2 and LLaMA: 4 layers of width 192, ~200
# MiB); a wider model's packed weights would take gigabytes and it checks
# drafts with the decode plans.
VERIFY_TOKENS = 4
VERIFY_WEIGHTS_MIB = 256


def plaintext_bytes(he_params) -> int:
    """Bytes of one weight plaintext encoded for products (NTT form, every data prime)."""
    return he_params.poly_modulus_degree * (len(he_params.coeff_modulus) - 1) * 8


class DecoderPlans:
    """Shape-only HE plans; both parties build the same ones from ``ModelShape``.

    Each linear layer of the blocks (the family's ``linear_shapes``) has two
    plans: a decode plan (one token per ciphertext, weights encoded once at
    load) and a packed plan (several tokens per ciphertext, weights encoded
    for each pass); a small model has a third, ``verify`` (VERIFY_TOKENS per
    ciphertext, weights encoded at load), for short passes. A pass of T
    tokens takes the one with the lowest estimated time (``for_pass``), so a
    decode step stays on the first, a prompt goes to the second and a
    speculative check to the third; both parties decide alike from T.
    """

    def __init__(self, shape: ModelShape, he_params):
        d, v = shape.n_embd, shape.vocab_size
        row = he_params.row_size
        # The token embedding is a product with a one-hot vector of the vocabulary
        # size, split into equal chunks that share one plan (outputs add up).
        # Long inputs make the diagonal method slow (a 4096-wide chunk for a
        # 192-wide output measured 20x slower than four 1024-wide ones), so the
        # chunk size is the one with the lowest estimated total time.
        candidates = [c for c in (256, 512, 1024, 2048, 4096) if c <= row] or [row]
        if v <= candidates[0]:
            candidates = [v]
        best = None
        for chunk in candidates:
            plan = MatvecPlan(min(chunk, v), d, he_params)
            cost = plan.est_seconds * -(-v // min(chunk, v))
            if best is None or cost < best[0]:
                best = (cost, plan)
        self.embed = best[1]
        self.embed_chunk = self.embed.d_in
        self.embed_chunks = -(-v // self.embed_chunk)
        self.linear_shapes = family(shape.family).linear_shapes(shape)
        self.decode = {name: matvec_plan(d_in, d_out, he_params) for name, (d_in, d_out) in self.linear_shapes.items()}
        self.packed = {name: packed_plan(d_in, d_out, he_params) for name, (d_in, d_out) in self.linear_shapes.items()}
        self.verify = {}
        for name, (d_in, d_out) in self.linear_shapes.items():
            if self.packed[name] is not None and VERIFY_TOKENS <= 2 * row // d_in:
                plan = MatvecPlan(d_in, d_out, he_params, tokens=VERIFY_TOKENS)
                if plan.est_seconds < pass_seconds(self.decode[name], VERIFY_TOKENS):
                    self.verify[name] = plan
        verify_bytes = shape.n_layer * sum(plan.n_plaintexts for plan in self.verify.values()) * plaintext_bytes(he_params)
        if verify_bytes > VERIFY_WEIGHTS_MIB * 2**20:
            self.verify = {}
        self.lm_head = matvec_plan(d, v, he_params)
        # The cache holds the key/value heads (fewer than the query heads under grouped-query attention).
        self.cache_layout = InnerKVCache(shape.n_kv_head, shape.head_dim, he_params)

    def for_pass(self, name: str, T: int) -> MatvecPlan:
        """The plan of linear ``name`` ("qkv", ...) for a pass of T tokens."""
        decode, packed, verify = self.decode[name], self.packed[name], self.verify.get(name)
        if packed is None or T < 2:
            return decode
        options = [(pass_seconds(decode, T), decode), (pass_seconds(packed, T), packed)]
        if verify is not None:
            options.append((pass_seconds(verify, T, pre_encoded=True), verify))
        return min(options, key=lambda option: option[0])[1]

    def matvec_plans(self):
        plans = [self.embed, self.lm_head, *self.decode.values()]
        return plans + [plan for plan in self.packed.values() if plan is not None] + list(self.verify.values())

    def galois_steps(self) -> list[int]:
        steps = set(self.cache_layout.galois_steps())
        for plan in self.matvec_plans():
            steps |= plan.galois_steps()
        return sorted(steps)


PREFILL_LAYOUTS = ("auto", "outer", "inner")


class PrefillLayoutPolicy:
    """Where the prompt of a conversation's first pass is kept in the encrypted cache.

    DESIGN section 5: prompt tokens "outer" (per head, K and V as d_head
    diagonal ciphertexts: a decode query costs d_head ct x ct products
    whatever the prompt length), generated tokens "inner" (B tokens per
    ciphertext: a query costs one product per block, linear in the context).
    Which is cheaper depends on the shape: for GPT-2 base (B = 10, d_head =
    64) the outer part wins past ~300 prompt tokens; for the shipped model
    (B = 42, d_head = 48) never within its 512-token context. So:

      inner - every token inner;
      outer - a first pass of >= 2 tokens (up to what one outer tile holds) goes outer;
      auto  - outer when the estimated decode-step attention cost is lower.

    Both parties build this from public values (shape, HE parameters, the
    client's choice sent in the handshake) and decide identically.
    """

    def __init__(self, shape: ModelShape, he_params, mode: str = "auto", costs: dict | None = None):
        if mode not in PREFILL_LAYOUTS:
            raise ValueError(f"prefill layout must be one of {PREFILL_LAYOUTS}, got {mode!r}")
        self.shape, self.params, self.mode = shape, he_params, mode
        self.costs = costs or DEFAULT_COSTS
        self.inner = InnerKVCache(shape.n_kv_head, shape.head_dim, he_params)
        self.max_outer = min(shape.n_positions, OuterAttentionPlan.max_tokens(shape.n_kv_head, shape.head_dim, he_params))

    def inner_seconds(self, n_tokens: int) -> float:
        """Estimated q K^T + p V time of one decode query (one query head per
        key/value head) over n inner tokens."""
        t, layout = self.costs, self.inner
        blocks = -(-n_tokens // layout.B)
        per_block = 2 * t["mul_ct"] + t["relin"] + fold_rotations(layout.dh) * t["rot"]
        return blocks * per_block + t["relin"] + (fold_rotations(layout.Bh) + 1) * t["rot"]

    def outer_seconds(self, n_tokens: int) -> float:
        """The same over an outer tile of n tokens: two diagonal products."""
        t, dh = self.costs, self.shape.head_dim
        n1 = OuterAttentionPlan.default_n1(dh)
        n2 = -(-dh // n1)
        product = dh * t["mul_ct"] + n2 * t["relin"] + (n1 + n2 - 2) * t["rot"]
        return 2 * product + fold_rotations(-(-n_tokens // dh)) * t["rot"]

    def use_outer(self, n_tokens: int) -> bool:
        """Store a first pass of n tokens outer?"""
        if self.mode == "inner" or not 2 <= n_tokens <= self.max_outer:
            return False
        return self.mode == "outer" or self.outer_seconds(n_tokens) < self.inner_seconds(n_tokens)

    def cached_prompt_seconds(self, T: int) -> float:
        """Estimated time of a first pass's own attention over the encrypted
        cache (one key/value head set per query, query group and block):
        conversions of q, k, v, scores, probabilities and outputs, and the
        ct x ct products."""
        g = self.shape.kv_groups
        t, blocks = self.costs, g * T * -(-T // self.inner.B)
        product = t["mul_ct"] + t["relin"] + fold_rotations(self.inner.dh) * t["rot"]
        return ((g + 2) * T + blocks) * t["to_he"] + (blocks + g * T) * t["from_he"] + 2 * blocks * (product + t["mul_ct"] / 2)

    def shared_prompt_seconds(self, T: int) -> float:
        """The same on shares (protocol/shared_matmul.py): the cache's blocks,
        both operands of Q K^T and of P V as column-packed ciphertexts, and
        plaintext products encoded on the fly."""
        t, H, dh = self.costs, self.shape.n_head, self.shape.head_dim
        try:
            plans = [ColumnProductPlan(H, T, dh, T, self.params), ColumnProductPlan(H, T, T, dh, self.params),
                     ColumnProductPlan(H, dh, T, T, self.params)]
        except ValueError:  # the prompt's rows do not fit a ciphertext for every head
            return float("inf")
        products = 2 * plans[0].n_products + plans[1].n_products + plans[2].n_products
        groups = 2 * plans[0].n_groups + plans[1].n_groups + plans[2].n_groups
        return ((2 * -(-T // self.inner.B) + 2 * dh + 2 * T) * t["to_he"] + groups * t["from_he"]
                + products * (t["mul"] + t["add"] + t["encode"]))

    def prompt_on_shares(self, T: int) -> bool:
        """Run a first pass of T tokens' own attention on shares (else over the cache)?"""
        return T >= 2 and self.shared_prompt_seconds(T) < self.cached_prompt_seconds(T)

    def may_use_outer(self) -> bool:
        return any(self.use_outer(n) for n in range(2, self.max_outer + 1))

    def plan(self, n_tokens: int) -> OuterAttentionPlan:
        return OuterAttentionPlan(self.shape.n_kv_head, self.shape.head_dim, n_tokens, self.params)

    def galois_steps(self) -> set[int]:
        """Rotation keys the outer part may need (none if it is never used)."""
        if not self.may_use_outer():
            return set()
        return OuterAttentionPlan.galois_steps_up_to(self.shape.n_kv_head, self.shape.head_dim, self.max_outer, self.params)


@dataclass
class EncodedLinear:
    plan: MatvecPlan  # the decode plan
    weights: list  # its pre-encoded NTT plaintexts (plan.encode_weights)
    bias: np.ndarray  # int64, at activation_bits + weight_bits fractional bits
    quantized: np.ndarray | None  # W (d_in x d_out) at weight_bits, int32, for the layers a pass may pack: it encodes its own diagonals
    verify_plan: MatvecPlan | None = None  # DecoderPlans.verify's plan, if any
    verify_weights: list | None = None  # its pre-encoded plaintexts


class EncodedDecoder:
    """The server's weights, quantised and encoded once as NTT plaintexts."""

    def __init__(self, prepared, plans: DecoderPlans, encoder, fixed_point: FixedPoint, progress=None):
        fp = fixed_point
        d = prepared.shape.n_embd
        self.fixed_point = fp
        tick = progress or (lambda: None)  # called once per encoded matrix (progress bars)

        # Embedding: rows of wte, zero-padded to whole chunks.
        padded = torch.zeros(plans.embed_chunks * plans.embed_chunk, d, dtype=torch.float64)
        padded[: prepared.shape.vocab_size] = prepared.wte
        wte_int = fp.quantize_weight(padded).reshape(plans.embed_chunks, plans.embed_chunk, d)
        self.embed = [plans.embed.encode_weights(encoder, chunk) for chunk in wte_int]
        # Learned positions, added at weight_bits (one-hot x wte has weight_bits); None for rotary ones.
        self.wpe = fp.quantize_weight(prepared.wpe) if prepared.wpe is not None else None
        tick()

        def linear(plan, lin, packable: bool, verify: MatvecPlan | None = None):
            quantized = fp.quantize_weight(lin.weight).astype(np.int32)
            enc = EncodedLinear(plan, plan.encode_weights(encoder, quantized), fp.quantize_product(lin.bias), quantized if packable else None,
                                verify, verify.encode_weights(encoder, quantized) if verify is not None else None)
            tick()
            return enc

        self.blocks = [
            {name: linear(plans.decode[name], block[name], plans.packed[name] is not None, plans.verify.get(name))
             for name in plans.linear_shapes}
            for block in prepared.blocks
        ]
        self.lm_head = linear(plans.lm_head, prepared.lm_head, packable=False)  # never packed (PACKED_TOKENS)

    @staticmethod
    def n_matrices(shape: ModelShape) -> int:
        """How many times ``progress`` is called (progress bars)."""
        return 2 + shape.n_layer * len(family(shape.family).linear_shapes(shape))


@dataclass
class LayerCache:
    """One layer's encrypted keys and values at the server: the prompt of the
    conversation's first pass when it is stored outer, and the inner blocks
    of every other token (DESIGN section 5)."""

    inner: InnerKVCache
    outer: OuterKVCache | None = None

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + (self.outer.nbytes if self.outer is not None else 0)


class SecureDecoder:
    """One party's side of the secure protocol for a decoder of any family (``families``).

    The encrypted cache of each layer has two parts (DESIGN section 5): the
    prompt of the first pass, kept in the outer layout when ``policy`` says
    so (``outer``: the shape-only OuterPart both parties track), and every
    later token in the inner layout. Server: ``encoded`` is an EncodedDecoder,
    ``caches`` holds one LayerCache per layer. Client: ``encoded`` is None and only
    token counts are tracked.
    """

    def __init__(
        self,
        party,
        shape: ModelShape,
        plans: DecoderPlans,
        fixed_point: FixedPoint,
        encoded: EncodedDecoder | None = None,
        policy: PrefillLayoutPolicy | None = None,
        he_workers=None,
    ):
        if party.is_server and encoded is None:
            raise ValueError("the server side needs the encoded model")
        if party.is_client and encoded is not None:
            raise ValueError("the client must never hold the model's weights")
        self.party, self.shape, self.plans, self.fp, self.encoded = party, shape, plans, fixed_point, encoded
        self.wiring = family(shape.family)  # the family's block (cryptogen_hf/families)
        self.policy = policy or PrefillLayoutPolicy(shape, party.he.params)
        # Server: the processes its HE products run in (server/he_workers.py; one by default).
        if party.is_server and he_workers is None:
            he_workers = HEWorkers(party.he, encoded, plans, 1, party.channel.timeout_s)
        self.he_workers = he_workers
        # Wall-clock seconds per protocol component (this party's view), for
        # the benchmarks' breakdown; reset with timings.clear().
        self.timings = defaultdict(float)
        # Work done since the session began (reset() does not clear it): lets a
        # caller check that a continued conversation did not recompute old tokens.
        self.passes = 0
        self.tokens_processed = 0
        self.refreshed_blocks = 0  # cache blocks sent through the masked round trip
        self.packed = True  # the current pass's choice (step)
        self.reset()

    @contextmanager
    def timed(self, component: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[component] += time.perf_counter() - start

    # ------------------------------------------------------------------ cache
    def reset(self):
        self.n_tokens = 0
        self.outer = None  # OuterPart of the prompt when it is stored outer
        if self.party.is_server:
            self.caches = [LayerCache(self._empty_inner()) for _ in range(self.shape.n_layer)]
        else:
            self.caches = None

    def _empty_inner(self) -> InnerKVCache:
        he = self.party.he
        return InnerKVCache(self.shape.n_kv_head, self.shape.head_dim, he.params, he.noise_model)

    @property
    def n_outer(self) -> int:
        """Tokens in the outer part of the cache (the rest are inner)."""
        return self.outer.n_tokens if self.outer is not None else 0

    def cache_nbytes(self) -> int:
        if not self.caches:
            return 0
        return sum(c.nbytes for c in self.caches)

    # ------------------------------------------------------------------ steps
    def step(self, token_ids, logits_for: list[bool], packed: bool = True):
        """Process the next T tokens in one pass (prefill: T > 1; decode: T = 1).

        token_ids: the client's T token ids (the server passes None).
        logits_for: T flags, public; only a suffix may be True (the positions
            whose logits the caller needs; the LM head runs for those only).
        packed: let the pass put several tokens per ciphertext and run a first
            pass's own attention on shares where that is estimated cheaper
            (``DecoderPlans.for_pass``, ``PrefillLayoutPolicy.prompt_on_shares``);
            False: one token per ciphertext, attention over the cache (the
            benchmarks' token-by-token baseline). Public, the same on both sides.
        Returns the logits shares (keep x vocab) or None when no flag is set.

        All T tokens go through each MPC op together, so a prefill of T tokens
        costs the rounds of one token; the cache grows by T.
        """
        T = len(logits_for)
        t0 = self.n_tokens
        keep = sum(bool(w) for w in logits_for)
        if keep and not all(logits_for[T - keep :]):
            raise ValueError("logits can be requested for a suffix of the new tokens only")
        if T == 0 or t0 + T > self.shape.n_positions:
            raise ValueError(f"{t0} + {T} tokens do not fit the model's context of {self.shape.n_positions}")
        if self.party.is_client and len(token_ids) != T:
            raise ValueError("one flag per token is needed")
        # A pass over T tokens legitimately keeps the peer busy about T times
        # longer between two messages (HE products are per token), so the
        # receive timeout scales with T for this pass. A peer that dies is still
        # reported at once: its connection closes.
        channel = self.party.channel
        base_timeout = channel.timeout_s
        channel.timeout_s = base_timeout * (1 + T // 8)
        # The first pass of a conversation may store its tokens in the outer layout.
        store_outer = self.policy.plan(T) if t0 == 0 and self.policy.use_outer(T) else None
        self.packed = packed
        try:
            if t0:
                with self.timed("refresh"):
                    self._refresh_weak_blocks()
            with self.timed("embedding"):
                h = self._embed(token_ids, t0, T)
            for layer in range(self.shape.n_layer):
                h = self.wiring.secure_block(self, layer, h, t0, T, store_outer)
        finally:
            channel.timeout_s = base_timeout
        if store_outer is not None:
            self.outer = OuterPart(store_outer)
        self.n_tokens += T
        self.passes += 1
        self.tokens_processed += T
        if not keep:
            return None
        x = self.norm(h[T - keep :], 2 * self.shape.n_layer)
        return self.linear(x, "lm_head", None)

    def _embed(self, token_ids, t0: int, T: int):
        """The client's one-hot rows (chunks of the vocabulary) times wte under HE, plus wpe."""
        party, plans = self.party, self.plans
        he = party.he
        plan = plans.embed
        n_chunks, chunk = plans.embed_chunks, plans.embed_chunk
        io = MatvecIO(plan, T)
        if party.is_client:
            one_hot = np.zeros((T, n_chunks * chunk), dtype=np.int64)
            one_hot[np.arange(T), token_ids] = 1
            slots = [v for c in range(n_chunks) for v in io.pack_input(one_hot[:, c * chunk : (c + 1) * chunk])]
            party.channel.send("embed.onehot", pack_blobs([he.encrypt_serialized(v) for v in slots]))
            outs = None
        else:
            blobs = unpack_blobs(party.channel.recv_payload("embed.onehot"))
            per_chunk = io.ciphertexts
            if len(blobs) != n_chunks * per_chunk:
                raise ValueError(f"client sent {len(blobs)} embedding ciphertexts, expected {n_chunks * per_chunk}")
            # Chunk c's ciphertexts meet wte's chunk c; the outputs of all chunks add up.
            outs = self.he_workers.matvec(("embed",), [he.load_ct(blob) for blob in blobs])
        learned_positions = party.is_server and self.encoded.wpe is not None
        wpe = self.encoded.wpe[t0 : t0 + T].reshape(-1) if learned_positions else None
        d = self.shape.n_embd
        h = he_to_shares(party, outs, io, self.fp.weight_bits, T * d, server_addend=wpe)
        return h.reshape(T, d)

    # ---------------------------------------------- layers a family's block calls
    def norm(self, h, index: int):
        """The ``index``-th norm of the model (2 per block, then the final one) on
        shares: LayerNorm or RMSNorm as the family has it, without its affine
        (folded into the next linear by the server)."""
        with self.timed("norm"):
            return ops.layer_norm(h, eps=self.shape.norm_eps, pre_scale=self.shape.norm_pre_scales[index],
                                  centered=self.wiring.NORM_CENTERED)

    def linear(self, x, name: str, layer: int | None):
        """x (T x d_in shares) @ W + b for the named linear layer of block
        ``layer`` (the LM head: name "lm_head", layer None) -> T x d_out shares (16 bits)."""
        party = self.party
        T = x.size(0)
        if layer is None:
            plan = self.plans.lm_head
        else:
            plan = self.plans.for_pass(name, T) if self.packed else self.plans.decode[name]
        io = MatvecIO(plan, T)
        with self.timed("to_he"):
            cts = shares_to_he(party, x.reshape(-1), io, self.fp.activation_bits)
        with self.timed(name):
            if party.is_server:
                enc = self.encoded.lm_head if layer is None else self.encoded.blocks[layer][name]
                if layer is None:
                    outs = self.he_workers.matvec(("lm_head",), cts)
                elif plan is enc.plan or plan is enc.verify_plan:  # weights encoded at load: split over the workers
                    outs = self.he_workers.matvec(("linear", layer, name, "decode" if plan is enc.plan else "verify"), cts)
                else:  # a packed pass encodes its weights now, in this process only
                    outs = plan.apply_all(party.he, plan.encode_weights(party.he, enc.quantized), cts)
                bias = np.tile(enc.bias, T)
            else:
                outs, bias = None, None
        bits = self.fp.activation_bits + self.fp.weight_bits
        with self.timed("from_he"):
            y = he_to_shares(party, outs, io, bits, T * plan.d_out, server_addend=bias)
        return y.reshape(T, plan.d_out)

    def attention(self, layer: int, qkv, t0: int, T: int, store_outer: OuterAttentionPlan | None):
        """Causal self-attention of T new tokens (positions t0..) over the
        encrypted cache, which their keys and values join. ``qkv``: shares
        (T, d_attn + 2 d_kv) of [q | k | v] (n_head query heads, n_kv_head
        key/value heads, each serving kv_groups consecutive query heads),
        the scale already in q. ``store_outer``: in a conversation's first pass, the outer plan
        its tokens are stored with (else they go to the inner layout).
        Returns shares (T, d_attn)."""
        if t0 == 0 and self.packed and self.policy.prompt_on_shares(T):
            return self._prompt_attention(layer, qkv, T, store_outer)
        return self._cached_attention(layer, qkv, t0, T, store_outer)

    def _prompt_attention(self, layer: int, qkv, T: int, store_outer: OuterAttentionPlan | None):
        """A conversation's first pass: its keys and values go into a new
        encrypted cache as whole blocks (or outer diagonals), and its own
        causal attention runs on shares (protocol/shared_matmul.py), with
        plaintext-ciphertext products only."""
        party, shape, fa = self.party, self.shape, self.fp.activation_bits
        d, dh = shape.d_attn, shape.head_dim
        kv_io = PromptKVIntoCache(self.plans.cache_layout, T, store_outer)
        with self.timed("to_he"):
            cts = shares_to_he(party, qkv[:, d:].reshape(-1), kv_io, fa)
        if party.is_server:
            k_cts, v_cts = kv_io.split(cts)
            if store_outer is not None:
                self.caches[layer].outer = OuterKVCache(store_outer, k_cts, v_cts, party.he.noise_model.fresh)
                self.he_workers.place_outer(layer, self.caches[layer].outer)
            else:
                self.caches[layer].inner.load_blocks(k_cts, v_cts, T)
        q = qkv[:, :d].reshape(T, shape.n_head, dh).permute(1, 0, 2)  # (head, T, dh)
        # Each key/value head serves kv_groups consecutive query heads (HF's repeat_kv), free on shares.
        group_of = torch.arange(shape.n_head) // shape.kv_groups
        k, v = (x.reshape(T, shape.n_kv_head, dh).index_select(1, group_of).permute(1, 0, 2)
                for x in (qkv[:, d : d + shape.d_kv], qkv[:, d + shape.d_kv :]))
        with self.timed("scores"):
            scores = shared_matmul(party, q, k.transpose(1, 2), fa, fa)
        with self.timed("softmax"):
            probs = ops.softmax(scores, dim=-1, causal=True)  # (heads, T, T)
        with self.timed("attn_values"):
            out = shared_matmul(party, probs, v, CRYPTEN_FRAC_BITS, fa)  # (heads, T, dh)
        return out.permute(1, 0, 2).reshape(T, d)

    def _cached_attention(self, layer: int, qkv, t0: int, T: int, store_outer: OuterAttentionPlan | None):
        """T queries against the encrypted cache (which their keys and values
        join first): a ciphertext-ciphertext product per query, query group
        and block. With ``store_outer`` (a short first pass) the tokens' own
        attention runs against the inner layout, then the inner blocks are
        dropped and K, V live on as diagonals.

        Grouped-query attention: the cache holds the n_kv_head key/value
        heads; a token's queries go in as kv_groups query ciphertexts, the
        j-th holding query head kv * kv_groups + j at key/value head kv's
        place, so each is an ordinary query of the cache's shape ("query
        rows" below: T x kv_groups of them)."""
        party, shape, fa = self.party, self.shape, self.fp.activation_bits
        d, g, kv_heads, dh = shape.d_attn, shape.kv_groups, shape.n_kv_head, shape.head_dim
        layout = self.plans.cache_layout
        outer, n_outer = self.outer, self.n_outer
        inner_t0, n_inner = t0 - n_outer, t0 + T - n_outer
        n_ctx, rows = t0 + T, T * g

        # q (T, kv head, group member, dh) -> (T, group member, kv head, dh): the query rows.
        q_rows = qkv[:, :d].reshape(T, kv_heads, g, dh).permute(0, 2, 1, 3).reshape(T, g * kv_heads * dh)
        # q, k, v re-encrypted fresh in the cache layouts; k, v join the cache.
        qkv_io = QKVIntoCache(layout, inner_t0, T, outer_query=outer.plan if outer else None, outer_store=store_outer, groups=g)
        with self.timed("to_he"):
            cts = shares_to_he(party, import_crypten().cat([q_rows, qkv[:, d:]], dim=1).reshape(-1), qkv_io, fa)
        with self.timed("scores"):
            if party.is_server:
                he, cts = party.he, qkv_io.split(cts)
                cache = self.caches[layer]
                for k_ct, v_ct in zip(cts["k"], cts["v"]):
                    cache.inner.append(he, k_ct, v_ct)
                outer_scores = self.he_workers.outer(layer, cache.outer, "scores", cts["q_outer"]) if outer is not None else None
                score_cts = []
                for i, inner_scores in enumerate(self.he_workers.scores(layer, cache.inner, cts["q"])):
                    if outer is not None:
                        score_cts.append(outer_scores[i])
                    score_cts.extend(inner_scores)
            else:
                score_cts = None
        with self.timed("from_he"):
            scores_io = ScoresFromCache(layout, n_inner, rows, outer)
            scores = he_to_shares(party, score_cts, scores_io, 2 * fa, rows * kv_heads * n_ctx)
        with self.timed("softmax"):
            # (group member x kv head, T, n_ctx): the public causal mask hides later tokens of the same pass.
            scores = scores.reshape(T, g * kv_heads, n_ctx).permute(1, 0, 2)
            probs = ops.softmax(scores, dim=-1, causal=T > 1).permute(1, 0, 2)  # back to the query rows' order

        with self.timed("to_he"):
            prob_cts = shares_to_he(party, probs.reshape(-1), ProbsIntoCache(layout, n_inner, rows, outer), CRYPTEN_FRAC_BITS)
        with self.timed("attn_values"):
            if party.is_server:
                per_row = len(prob_cts) // rows
                row_cts = [prob_cts[i * per_row : (i + 1) * per_row] for i in range(rows)]
                cache = self.caches[layer]
                out_cts = self.he_workers.attend(layer, cache.inner, [row[outer is not None :] for row in row_cts])
                if outer is not None:
                    out_cts += self.he_workers.outer(layer, cache.outer, "attend", [row[0] for row in row_cts])
                if store_outer is not None:
                    fresh = party.he.noise_model.fresh
                    cache.outer = OuterKVCache(store_outer, cts["k_diag"], cts["v_diag"], fresh)
                    self.he_workers.place_outer(layer, cache.outer)
                    cache.inner = self._empty_inner()
            else:
                out_cts = None
        with self.timed("from_he"):
            out_io = AttentionOutput(layout, rows, outer)
            parts = he_to_shares(party, out_cts, out_io, fa + CRYPTEN_FRAC_BITS, out_io.parts * rows * kv_heads * dh)
        out = parts.reshape(out_io.parts, T, g, kv_heads, dh).sum(dim=0)  # inner + outer contributions, free on shares
        return out.permute(0, 2, 1, 3).reshape(T, d)  # query head kv * g + j

    # ------------------------------------------------------------- benchmarks
    def fill_for_benchmark(self, n_tokens: int, seed: int = 0):
        """Fill an empty cache with n_tokens of random keys and values, laid out
        as a first pass of n_tokens would be (outer or inner, per the policy).

        A benchmark facility: timing a decode step at context 512 of a
        GPT-2-base-wide model would otherwise need a prefill of hours on two
        cores. The client encrypts random values under its own key (values of
        the size real keys and values have); no model computation runs and
        nothing about the model or a real input is exchanged.
        """
        if self.n_tokens:
            raise ValueError("fill_for_benchmark needs an empty cache (reset() first)")
        party, shape, he = self.party, self.shape, self.party.he
        if not 1 <= n_tokens <= shape.n_positions:
            raise ValueError(f"cannot fill {n_tokens} tokens into a context of {shape.n_positions}")
        outer = self.policy.plan(n_tokens) if self.policy.use_outer(n_tokens) else None
        layout = self.plans.cache_layout
        if party.is_client:
            rng = np.random.default_rng(seed)
            scale = 4 << self.fp.activation_bits  # |k|, |v| up to ~4: GPT-2's typical range
            blobs = []
            for _ in range(shape.n_layer):
                K, V = rng.integers(-scale, scale, size=(2, n_tokens, shape.n_kv_head, shape.head_dim))
                if outer is not None:
                    slots = pack_outer_kv(outer, K, V)
                else:
                    slots = []
                    for X in (K, V):
                        blocks = np.zeros((-(-n_tokens // layout.B), he.slot_count), dtype=np.int64)
                        for t in range(n_tokens):
                            blocks[t // layout.B] += layout.pack_token(X[t].reshape(-1), t)
                        slots.extend(blocks)
                blobs.extend(he.encrypt_serialized(v) for v in slots)
            party.channel.send("bench.fill", pack_blobs(blobs))
        else:
            blobs = unpack_blobs(party.channel.recv_payload("bench.fill"))
            if outer is not None:
                per_layer = sum(int(nonzero.sum()) for nonzero in outer.key_value_nonzero())
            else:
                per_layer = 2 * -(-n_tokens // layout.B)
            if len(blobs) != per_layer * shape.n_layer:  # counted before any ciphertext is parsed
                raise ValueError(f"client sent {len(blobs)} cache-fill ciphertexts, expected {per_layer * shape.n_layer}")
            for layer in range(shape.n_layer):
                cts = [he.load_ct(b) for b in blobs[layer * per_layer : (layer + 1) * per_layer]]
                if outer is not None:
                    k_diag, v_diag = unpack_outer_kv(outer, cts)
                    self.caches[layer].outer = OuterKVCache(outer, k_diag, v_diag, he.noise_model.fresh)
                    self.he_workers.place_outer(layer, self.caches[layer].outer)
                else:
                    half = len(cts) // 2
                    self.caches[layer].inner.load_blocks(cts[:half], cts[half:], n_tokens)
        if outer is not None:
            self.outer = OuterPart(outer)
        self.n_tokens = n_tokens

    # ------------------------------------------------------- refresh and crop
    def _refresh_weak_blocks(self):
        """Lazy noise refresh: the server names the cache blocks whose estimated
        budget would not survive the next attention kernels (a small message
        every pass, usually an empty list) and both run the masked round trip."""
        party = self.party
        if party.is_server:
            plan = [(layer, b) for layer, cache in enumerate(self.caches) for b in cache.inner.blocks_needing_refresh()]
            party.channel.send("step.refresh_plan", json.dumps(plan).encode())
        else:
            plan = [tuple(x) for x in json.loads(party.channel.recv_payload("step.refresh_plan"))]
        if plan:
            self._masked_round_trip(plan)

    def _dropped_slots(self, block: int, keep_tokens: int | None) -> np.ndarray:
        layout = self.plans.cache_layout
        if keep_tokens is None:
            return np.zeros(0, dtype=np.int64)
        first = max(keep_tokens, block * layout.B)
        tokens = range(first, (block + 1) * layout.B)
        return np.concatenate([layout.token_slots(t) for t in tokens]) if len(tokens) else np.zeros(0, dtype=np.int64)

    def _masked_round_trip(self, blocks: list[tuple[int, int]], keep_tokens: int | None = None):
        """Re-encrypt cache blocks (layer, block) fresh without revealing them.

        The server adds an independent uniform mask in Z_p to every slot of each
        K and V ciphertext, re-randomised and noise-flooded (a block with a
        server-computed token went through a plaintext product whose noise
        depends on the activations: ``ServerHE.mask_for_client``); the client
        decrypts (it sees uniform values only) and encrypts the result anew;
        the server subtracts its mask. The block's
        noise is back to that of a fresh encryption. Slots of tokens >=
        ``keep_tokens`` come back as zeros: that is how the cache is cropped.
        """
        party = self.party
        he = party.he
        if party.is_server:
            masks, blobs = [], []
            for layer, b in blocks:
                cache = self.caches[layer].inner
                for ct in (cache.k_cts[b], cache.v_cts[b]):
                    r = uniform_mod(he.p, he.slot_count)
                    masks.append(r)
                    blobs.append(he.serialize_ct(he.mask_for_client(ct, r)))
            party.channel.send("refresh.masked", pack_blobs(blobs))
            fresh = unpack_blobs(party.channel.recv_payload("refresh.fresh"))
            if len(fresh) != len(blobs):
                raise ValueError(f"client returned {len(fresh)} refreshed ciphertexts, expected {len(blobs)}")
            for i, (layer, b) in enumerate(blocks):
                drop = self._dropped_slots(b, keep_tokens)
                k_mask, v_mask = masks[2 * i].copy(), masks[2 * i + 1].copy()
                k_mask[drop] = 0
                v_mask[drop] = 0
                k = he.sub_plain(he.load_ct(fresh[2 * i]), k_mask)
                v = he.sub_plain(he.load_ct(fresh[2 * i + 1]), v_mask)
                self.caches[layer].inner.replace_block(b, k, v)
        else:
            blobs = unpack_blobs(party.channel.recv_payload("refresh.masked"))
            out = []
            for i, blob in enumerate(blobs):
                slots = he.decrypt(he.load_ct(blob))
                slots[self._dropped_slots(blocks[i // 2][1], keep_tokens)] = 0
                out.append(he.encrypt_serialized(slots))
            party.channel.send("refresh.fresh", pack_blobs(out))
        self.refreshed_blocks += len(blocks)

    def crop(self, n_tokens: int):
        """Keep the first ``n_tokens`` tokens of the cache, without decrypting it.

        Inner part: whole blocks past them are dropped; the last kept block, if
        partly cropped, goes through the masked round trip with the cropped
        slots zeroed. Outer part (a prompt stored outer): its ciphertexts stay;
        the tokens past the crop simply get no score and zero probability.
        """
        if not 0 <= n_tokens <= self.n_tokens:
            raise ValueError(f"cannot crop a cache of {self.n_tokens} tokens to {n_tokens}")
        if n_tokens == self.n_tokens:
            return
        if n_tokens == 0:
            self.reset()
            return
        n_outer = self.n_outer
        if n_tokens <= n_outer:
            self.outer.n_tokens = n_tokens
            if self.party.is_server:
                for cache in self.caches:
                    cache.inner = self._empty_inner()
        else:
            keep = n_tokens - n_outer  # inner tokens kept
            B = self.plans.cache_layout.B
            if keep % B:
                self._masked_round_trip([(layer, keep // B) for layer in range(self.shape.n_layer)], keep_tokens=keep)
            if self.party.is_server:
                for cache in self.caches:
                    cache.inner.truncate(keep)
        self.n_tokens = n_tokens

    # --------------------------------------------------------------- reveal
    def reveal_to_client(self, logits, what: str = "logits", temperature: float | None = None) -> torch.Tensor | None:
        """Open the logits shares (keep x vocab) to the client only; None at the server.

        what="logits": the float64 logits, decoded exactly from the ring
        (CrypTen's get_plain_text decodes negative values with an off-by-one
        in the divisor and through float32; logits need better than that).
        what="token": only an index is opened; the row is 0 there and -inf
        elsewhere, so generate() picks it whatever it does next. Without
        ``temperature`` the index is the argmax (inside MPC); with it, a token
        drawn from softmax(logits / temperature) with randomness neither party
        chooses (``ops.sample_reveal``).
        """
        client = rank_of(CLIENT)
        if what == "logits":
            ring = logits._tensor.reveal(dst=client)
            if self.party.is_server:
                return None
            return ring.double().reshape(-1, self.shape.vocab_size) / 2.0**CRYPTEN_FRAC_BITS
        if what != "token":
            raise ValueError(f"unknown reveal mode {what!r}")
        rows = []
        for i in range(logits.size(0)):
            if temperature is None:
                index = ops.argmax_reveal(logits[i], dst=client)
            else:
                index = ops.sample_reveal(logits[i] * (1.0 / temperature), client, rank_of(SERVER), client)
            if self.party.is_client:
                row = torch.full((self.shape.vocab_size,), float("-inf"), dtype=torch.float64)
                row[index] = 0.0
                rows.append(row)
        return torch.stack(rows) if rows else None
