"""Non-linear ops of a decoder block on CrypTen secret shares.

Every function here is SPMD: the server and the client call it with their
own MPCTensor (shares of the same value), in the same order, with the same
public arguments. Public arguments (masks, scales, iteration counts) must be
equal on both sides.

Accuracy notes (measured numbers: scripts/bench_mpc_ops.py and the report):
CrypTen works in fixed point with 16 fractional bits (resolution 1.5e-5);
its stock exp/reciprocal/inv_sqrt initial guesses only converge on small
ranges. The ops below avoid that with one trick, used three times:

    "power-of-two bracketing": compare the secret v with K public thresholds
    base**k in ONE batched comparison (the rounds of a single comparison).
    The bits b_k = [v >= base**k] are monotone, so any function f(k*) of the
    bracket k* is a PUBLIC linear combination of the bits (telescoping sum):
    f(k*) = f(k_lo - 1) + sum_k b_k (f(k) - f(k - 1)), i.e. free. With
    p = 2**-k* we rescale v into [1, base), where a fixed linear initial guess
    plus 2 Newton steps reaches ~1e-5 relative error. The rescaling by p is
    undone with the SAME shares of p, so p need not be exact.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

from cryptogen_hf.crypten_compat import import_crypten

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402  (after the shim)
from crypten.config import cfg  # noqa: E402
from crypten.encoder import FixedPointEncoder  # noqa: E402

from .compare import ACTIVATION_BITS, RING_BITS, ge_zero  # noqa: E402

# A bracket compares v with its thresholds exactly for |v| up to 2**BRACKET_MARGIN_BITS
# times the largest threshold (beyond the bracket, every bit must still read 1).
BRACKET_MARGIN_BITS = 8
_PRECISION_BITS = 16  # CrypTen's default encoder precision (cfg.encoder.precision_bits)

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _bracket_scale(v, base_log2: int, k_lo: int, k_hi: int):
    """Shares of p = 2**-k* where k* = max{k: v >= 2**(base_log2*k)},
    clamped to [k_lo - 1, k_hi]; so v * p**base_log2 lies in
    [1, 2**base_log2) whenever v is inside the bracketed range.
    One batched comparison of v against the K = k_hi - k_lo + 1 public
    thresholds; p is then a public linear combination of the bits.

    v: MPCTensor (...,); returns MPCTensor p of the same shape.
    """
    if k_hi > _PRECISION_BITS or k_lo - 1 < -30:
        raise ValueError("bracket range outside the exact fixed-point range")
    ks = torch.arange(k_lo, k_hi + 1, dtype=torch.float64)
    thresholds = torch.pow(2.0, base_log2 * ks).float()
    width = min(RING_BITS, base_log2 * k_hi + _PRECISION_BITS + BRACKET_MARGIN_BITS + 1)
    bits = ge_zero(v.unsqueeze(-1) - thresholds, width)  # (..., K), one comparison
    # CrypTen returns comparison bits as integers (encoder scale 1). The
    # telescoping sum p = 2**-(k_lo-1) + sum_k b_k (2**-k - 2**-(k-1)) is
    # formed with INTEGER weights w_k = (2**-k - 2**-(k-1)) * 2**16 (exact
    # for k <= 16; no truncation), then the result is re-labelled as a
    # 16-bit fixed-point number: p is exact.
    scale = 2**_PRECISION_BITS
    weights = torch.tensor(
        [round((2.0 ** (-k) - 2.0 ** (-(k - 1))) * scale) for k in range(k_lo, k_hi + 1)],
        dtype=torch.long,
    )
    p = (bits * weights).sum(-1) + int(round(2.0 ** (-(k_lo - 1)) * scale))
    p.encoder = FixedPointEncoder(precision_bits=_PRECISION_BITS)
    return p


# ---------------------------------------------------------------------------
# Reciprocal of a positive value with a known range (softmax denominators)
# ---------------------------------------------------------------------------
# Linear initial guess for 1/x on [1, 2): 24/17 - 8/17 x, max relative error 1/17;
# Newton y <- y (2 - x y) squares the relative error each step.
_RECIP_A, _RECIP_B = 24.0 / 17.0, -8.0 / 17.0


def reciprocal_bracketed(s, max_value: float, extra=None, nr_iters: int = 2):
    """1/s for 1 <= s <= max_value (public bound), s of shape (...,).
    If `extra` (shape (..., m)) is given, returns extra / s[..., None]
    instead, computed as (extra * p) * r with r = 1/(s*p): this keeps full
    precision when 1/s is small, and p cancels exactly.

    Rounds: 1 comparison + 1 multiplication + 2 per Newton step (+1 for extra).
    """
    k_hi = max(1, math.ceil(math.log2(max(max_value, 2.0))))
    p = _bracket_scale(s, 1, 1, k_hi)  # p = 2**-k*, s*p in [1, 2)
    if extra is None:
        s_hat = s * p
        scaled = None
    else:
        # One multiplication round for both s*p and extra*p.
        n_extra = extra.size(-1)
        both = crypten.cat([s.unsqueeze(-1), extra], dim=-1) * p.unsqueeze(-1)
        s_hat = both[..., 0]
        scaled = both[..., 1 : 1 + n_extra]
    y = s_hat * _RECIP_B + _RECIP_A
    for _ in range(nr_iters):
        y = y * (2 - s_hat * y)
    if extra is None:
        return y * p
    return scaled * y.unsqueeze(-1)


# ---------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------


# Group size of the max tournament. A level compares all pairs of a group in
# ONE batched comparison (~8 rounds), then picks the winner with ~log2(g) + 1
# multiplication rounds. Groups of g make (g - 1)/2 comparisons per member
# per level: about n comparisons in all for g = 2, 2n for g = 4.
# Measured for a (12, 1, 512) softmax (scripts/bench_mpc_ops.py, this 2-core
# machine), with a dealer (client dealer / TTP), where rounds cost most:
#   g = 2: 103 rounds,  7.4 MiB, 0.33 s / 0.62 s (before the leaner TTP wire)
#   g = 4:  75 rounds, 13.6 MiB, 0.29 s / 0.35 s
#   g = 8:  58 rounds, 25.2 MiB, 0.26 s / 0.32 s
# Without a dealer every AND gate is made by HE, so comparisons cost most:
# the max alone of (12, 1, 512) takes 4.3 s with g = 4 (1.19 M AND gates)
# and 2.3 s with g = 2 (0.60 M), rounds notwithstanding.
MAX_GROUP = 4
MAX_GROUP_WITHOUT_DEALER = 2
# The max need not be exact: softmax is shift-invariant, and it only has to
# keep exp's argument x - max near or below 0. So pairwise comparisons
# ignore the low 12 bits (compare.py): a level may pick the member up to
# 2**-4 below its partner, so the result is at most levels * 2**-4 below the
# true max (0.56 for 512 keys) and never above it. Only for pairs: in a
# group of 3 or more, misread ties can form a cycle (0 beats 1 beats 2 beats
# 0) with no winner, so larger groups compare exactly.
MAX_SLACK_BITS = 12
MAX_SLACK = 2.0 ** (MAX_SLACK_BITS - _PRECISION_BITS)


def _max_group() -> int:
    from .two_party import PROVIDER_NAME

    return MAX_GROUP_WITHOUT_DEALER if cfg.mpc.provider == PROVIDER_NAME else MAX_GROUP


@functools.lru_cache(maxsize=None)
def _tournament_indices(g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a group of g: the pairs (i < j) compared, and for each member i the
    g - 1 entries of [c, 1 - c] (c_ij = [x_i >= x_j]) that say "i beats j":
    c_ij for j > i, 1 - c_ji for j < i. i wins iff all are 1; ties go to the
    lowest index, so exactly one member wins."""
    pairs = [(i, j) for i in range(g) for j in range(i + 1, g)]
    pair_index = {pair: k for k, pair in enumerate(pairs)}
    n_pairs = len(pairs)
    beats = [[pair_index[(i, j)] if j > i else n_pairs + pair_index[(j, i)] for j in range(g) if j != i] for i in range(g)]
    left = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    right = torch.tensor([j for _, j in pairs], dtype=torch.long)
    return left, right, torch.tensor(beats, dtype=torch.long).reshape(-1)


def _product_last_dim(bits):
    """Product along the last dim of shared 0/1 values (encoder scale 1, so
    exact, no truncation): a tree, ceil(log2 k) multiplication rounds."""
    while bits.size(-1) > 1:
        k = bits.size(-1)
        half = k // 2
        prod = bits[..., :half] * bits[..., half : 2 * half]
        bits = crypten.cat([prod, bits[..., 2 * half :]], dim=-1) if k % 2 else prod
    return bits[..., 0]


def _max_last_dim(x, group: int | None = None):
    """Row max along the last dim by a tournament of groups of up to `group`
    members: ceil(log_group n) levels, each one batched comparison of all
    pairs in every group plus ~log2(group) + 1 multiplication rounds. Rows are
    padded with copies of their first entry (a real score, so the max is
    unchanged). ``group`` defaults to the cheaper size for the session's
    provider (:func:`_max_group`). Returns (..., 1): with groups of 2, one of
    the row's entries at most MAX_SLACK per level below its max."""
    group = group or _max_group()
    while x.size(-1) > 1:
        n = x.size(-1)
        g = min(group, n)
        n_groups = -(-n // g)
        if n_groups * g != n:
            pad = x[..., :1].expand(*x.shape[:-1], n_groups * g - n)
            x = crypten.cat([x, pad], dim=-1)
        members = x.reshape(*x.shape[:-1], n_groups, g)
        left, right, beats = _tournament_indices(g)
        diff = members.index_select(-1, left) - members.index_select(-1, right)
        c = ge_zero(diff, ACTIVATION_BITS, ignore_low_bits=MAX_SLACK_BITS if g == 2 else 0)  # (..., G, pairs)
        wins = crypten.cat([c, 1 - c], dim=-1).index_select(-1, beats)
        winner = _product_last_dim(wins.reshape(*wins.shape[:-1], g, g - 1))  # (..., G, g), one-hot
        x = (winner * members).sum(-1)  # (..., G)
    return x


def causal_mask(t_query: int, t_key: int) -> torch.Tensor:
    """Public 0/1 mask: query i (the i-th of the last t_query positions)
    sees keys j <= i + (t_key - t_query)."""
    q = torch.arange(t_query).unsqueeze(-1) + (t_key - t_query)
    k = torch.arange(t_key).unsqueeze(0)
    return (k <= q).float()


def softmax(x, dim: int = -1, causal: bool = False, exp_iterations: int = 8, nr_iters: int = 2):
    """softmax over `dim` of shares x.

    causal=True applies a public causal mask to the last two dims
    (..., T_query, T_key) (prefill). Decode shape (heads, 1, context) needs no
    mask. Masked scores are replaced by the row's first score (always
    visible) before the max, so the max is over visible entries only, and
    their exp is zeroed by the public mask.

    Steps: row max (tournament, groups of _max_group()) -> exp(x - max) by CrypTen's limit method
    (domain x - max in [-2**exp_iterations, 0]) -> sum in [1, n] ->
    bracketed reciprocal -> e * (1/sum) with the p-rescaling.
    """
    if dim not in (-1, x.dim() - 1):
        x = x.transpose(dim, -1)
        out = softmax(x, -1, causal, exp_iterations, nr_iters)
        return out.transpose(dim, -1)
    n = x.size(-1)
    mask = None
    if causal:
        if x.dim() < 2:
            raise ValueError("causal softmax needs (..., T_query, T_key) scores")
        mask = causal_mask(x.size(-2), n)
        x = x * mask + x[..., :1] * (1 - mask)  # public 0/1 multiplications

    m = _max_last_dim(x)
    t = x - m  # <= levels * MAX_SLACK (the max's comparisons are coarse)
    with cfg.temp_override({"functions.exp_iterations": exp_iterations}):
        e = t.exp()
    if mask is not None:
        e = e * mask
    # The true max's entry contributes exp(>= 0) >= 1, and each of the n
    # entries at most exp(levels * MAX_SLACK): s in [1, n e**(levels*slack)].
    s = e.sum(-1)
    levels = math.ceil(math.log2(n)) if n > 1 else 0
    return reciprocal_bracketed(s, n * math.exp(levels * MAX_SLACK), extra=e, nr_iters=nr_iters)


# ---------------------------------------------------------------------------
# GELU (GPT-2's gelu_new, the tanh form) and SiLU (LLaMA's MLP gate)
# ---------------------------------------------------------------------------
# Both are x/2 + E(x) with E even: gelu: E = (x/2) tanh(sqrt(2/pi)(x + 0.044715 x^3));
# silu: E = x sigmoid(x) - x/2 = (x/2) tanh(x/2). Outside [-cut, cut] the
# function is x (x > cut) or 0 (x < -cut) up to the tail error; inside, E is
# an even Chebyshev polynomial of the given degree in u = 2 x^2 / cut^2 - 1.
# Max abs error (fit + tail, float64): gelu 3.5 / 6: 1e-3; silu 11 / 16:
# 1.1e-4 + 1.8e-4 (silu(-11) = -1.8e-4; a cut of 8 would leave 2.7e-3).
GELU_CUT = 3.5
GELU_DEGREE = 6  # (degree 12 in x)
SILU_CUT = 11.0
SILU_DEGREE = 16  # the rounds of degree 9..16 are the same: 4 levels of products
# The cut comparisons may misread x within 2**-5 past the cut (compare.py):
# there the polynomial, extrapolated, is off by at most 8e-4 for gelu (1.5e-3 for 2**-4).
ACTIVATION_SLACK_BITS = 11


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new in plaintext (== transformers' NewGELUActivation)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def silu_reference(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


_REFERENCES = {"gelu": gelu_reference, "silu": silu_reference}


@functools.lru_cache(maxsize=None)
def _even_part_coefficients(name: str, cut: float, degree: int) -> tuple:
    """Chebyshev coefficients of E(x) = f(x) - x/2 (an even function) in
    u = 2 x^2 / cut^2 - 1 on [-cut, cut]. Near-minimax fit by iteratively
    reweighted least squares; deterministic, so both parties get the same
    numbers. The Chebyshev basis keeps coefficients small (fixed-point error
    is not amplified as with monomials)."""
    xs = np.linspace(0.0, cut, 4001)
    target = _REFERENCES[name](torch.from_numpy(xs)).numpy() - 0.5 * xs
    u = 2.0 * (xs / cut) ** 2 - 1.0
    basis = np.polynomial.chebyshev.chebvander(u, degree)
    w = np.ones_like(xs)
    for _ in range(30):
        coef = np.linalg.lstsq(basis * w[:, None], target * w, rcond=None)[0]
        r = np.abs(basis @ coef - target)
        w = w * np.sqrt(r / r.max() + 1e-3)
        w /= w.max()
    return tuple(float(c) for c in coef)


def _chebyshev_values(u, degree: int):
    """[T_0(u) .. T_degree(u)] with few rounds: T_2k = 2 T_k^2 - 1 and
    T_{j+k} = 2 T_j T_k - T_{|j-k|}, each level batched in one multiplication."""
    T = {1: u}
    have = 1
    while have < degree:
        # Next level: every index in (have, min(2*have, degree)] from T_j * T_k, j, k <= have.
        targets = list(range(have + 1, min(2 * have, degree) + 1))
        lefts, rights, subs = [], [], []
        for n in targets:
            j = have
            k = n - have
            lefts.append(T[j])
            rights.append(T[k])
            subs.append(abs(j - k))
        prod = crypten.stack(lefts) * crypten.stack(rights)
        for i, n in enumerate(targets):
            sub = subs[i]
            T[n] = 2 * prod[i] - (1.0 if sub == 0 else T[sub])
        have = targets[-1]
    return T


def _half_x_plus_even(x, name: str, cut: float, degree: int):
    """f(x) = x/2 + E(x) for f in _REFERENCES: E by the even Chebyshev
    polynomial on [-cut, cut]; outside, x (x > cut) or 0 (x < -cut). The two
    comparisons [x > cut] and [x < -cut] are one batched comparison; the
    polynomial needs 1 + ceil(log2 degree) multiplication rounds; the
    selection one more."""
    coef = _even_part_coefficients(name, cut, degree)
    # Both comparisons in one call: stack [x - cut, -x - cut] and test >= 0.
    # Coarse (ACTIVATION_SLACK_BITS): just past the cut, the polynomial may be
    # used instead of x or 0, which adds little there (tested).
    c = ge_zero(crypten.stack([x - cut, -x - cut]), ACTIVATION_BITS, ignore_low_bits=ACTIVATION_SLACK_BITS)
    above, below = c[0], c[1]

    u = x.square() * (2.0 / (cut * cut)) - 1.0
    T = _chebyshev_values(u, degree)
    poly = T[1] * coef[1] + coef[0]
    for n in range(2, degree + 1):
        poly = poly + T[n] * coef[n]

    half_x = x * 0.5
    inside = half_x + poly
    # out = inside + above*(x - inside) + below*(0 - inside), one mult round.
    sel = crypten.stack([above, below]) * crypten.stack([x - inside, -inside])
    return inside + sel[0] + sel[1]


def gelu(x, cut: float = GELU_CUT, degree: int = GELU_DEGREE):
    """gelu_new(x); max abs error on [-8, 8] ~1e-3 (see tests)."""
    return _half_x_plus_even(x, "gelu", cut, degree)


def silu(x, cut: float = SILU_CUT, degree: int = SILU_DEGREE):
    """silu(x) = x sigmoid(x); max abs error ~1e-3 (see tests)."""
    return _half_x_plus_even(x, "silu", cut, degree)


def swiglu(gate_up):
    """silu(gate) * up for [gate | up] along the last dimension (LLaMA's MLP):
    the activation, then one multiplication round for the product of two secrets."""
    d = gate_up.size(-1) // 2
    return silu(gate_up[..., :d]) * gate_up[..., d:]


# ---------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------
_ISQRT_A, _ISQRT_B = 1.06, -0.15  # 1/sqrt(x) ~ a + b x on [1, 4), rel. error 0.09


def calibrate_pre_scale(activations_sample, eps: float = 1e-5, centered: bool = True) -> float:
    """Public per-layer scale for :func:`layer_norm`, from plaintext
    activations the server collects (e.g. on a calibration text).

    Rows (last dim) have standard deviations (root mean squares for an
    uncentered norm) in [sd_lo, sd_hi]; the scale centres them geometrically
    around 1 (s = 1 / sqrt(sd_lo * sd_hi)), which keeps small rows above the
    fixed-point resolution and large rows far from overflow. The norm is
    scale-invariant except for eps, which layer_norm rescales by s**2.
    """
    a = torch.as_tensor(activations_sample, dtype=torch.float64)
    a = a.reshape(-1, a.shape[-1])
    if centered:
        a = a - a.mean(dim=-1, keepdim=True)
    sd = torch.sqrt((a**2).mean(dim=-1) + eps)
    sd_lo, sd_hi = float(sd.min()), float(sd.max())
    return float(1.0 / math.sqrt(sd_lo * sd_hi))


def layer_norm(
    x,
    eps: float = 1e-5,
    pre_scale: float = 1.0,
    weight=None,
    bias=None,
    nr_iters: int = 2,
    k_range: tuple = (-2, 10),
    centered: bool = True,
):
    """Normalized LayerNorm (x - mean) / sqrt(var + eps) over the last dim;
    with ``centered=False``, RMSNorm x / sqrt(mean(x^2) + eps) (LLaMA).

    The affine gamma/beta are NOT applied by default: they are server weights
    that the server folds into the next HE linear layer in plaintext
    (W' = diag(gamma) W, b' = beta W + b), which costs nothing. `weight` /
    `bias` (plaintext torch tensors or MPCTensors, e.g. server-shared) are
    applied if given, for completeness (one more multiplication round if
    weight is an MPCTensor, none if it is public).

    pre_scale: public, from calibrate_pre_scale; x is multiplied by it first
    and eps by its square, which leaves the result unchanged in exact
    arithmetic but brings the variance into the fixed-point sweet spot.

    Method: S = sum (x - mean)^2 (not the mean: d times more fixed-point
    precision); p = 2**-k* from one batched comparison of S with 4**k,
    k in k_range; S_hat = S p^2 in [1, 4); r = 1/sqrt(S_hat) by a linear
    guess + Newton; out = (xc * p) * r * sqrt(d). Valid for
    S + d eps' in [4**(k_lo-1), 4**(k_hi+1)), i.e. for d = 768 and the
    default k_range, scaled row sd from ~0.002 to ~70.
    """
    d = x.size(-1)
    if pre_scale != 1.0:
        x = x * float(pre_scale)
    eps_scaled = float(eps) * float(pre_scale) ** 2
    xc = x - x.mean(-1, keepdim=True) if centered else x
    S = xc.square().sum(-1) + d * eps_scaled  # (...,)

    k_lo, k_hi = k_range
    p = _bracket_scale(S, 2, k_lo, k_hi)  # 2**-k*, S * p^2 in [1, 4)
    # Round 1: S*p together with xc*p (one multiplication).
    both = crypten.cat([S.unsqueeze(-1), xc], dim=-1) * p.unsqueeze(-1)
    Sp = both[..., 0]
    xcp = both[..., 1:]
    S_hat = Sp * p  # round 2
    y = S_hat * _ISQRT_B + _ISQRT_A
    for _ in range(nr_iters):
        # y <- y (3 - S_hat y^2) / 2, as 2 rounds: [y*y, S_hat*y] then product.
        pair = crypten.stack([y, S_hat]) * crypten.stack([y, y])
        y = y * 1.5 - (pair[0] * pair[1]) * 0.5
    out = xcp * (y * math.sqrt(d)).unsqueeze(-1)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def layer_norm_reference(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)


# ---------------------------------------------------------------------------
# Argmax revealing only the index to one party
# ---------------------------------------------------------------------------


def argmax_reveal(x, dst: int):
    """Index of the max of the 1-D shared vector x, revealed to rank `dst`
    only (returns the int there, None at the other party). The one-hot
    vector is computed in MPC (CrypTen's log-reduction argmax, ties broken
    at random) and only its index is opened, to dst."""
    one_hot = x.argmax(dim=0, one_hot=True)
    idx = (one_hot * torch.arange(x.size(0), dtype=torch.float32)).sum()
    value = idx.get_plain_text(dst=dst)
    if value is None:
        return None
    return int(round(float(value)))


# ---------------------------------------------------------------------------
# Sampling that opens only the sampled token
# ---------------------------------------------------------------------------
# The softmax over a vocabulary of scaled logits: exp by the limit method on
# x - max in [-2**10, 0] (a row of logits / temperature spans more than the
# attention scores' 2**8).
SAMPLE_EXP_ITERATIONS = 10
UNIFORM_BITS = 16


def joint_uniform(rank_server: int, rank_client: int):
    """Shares of u uniform on [0, 1) that neither party chooses: each draws
    its own uniform value (from the OS), u = (u_server + u_client) mod 1 by
    one comparison. u is uniform if either party's draw is, so a client that
    picks its value cannot steer the sample."""
    mine = torch.tensor([int.from_bytes(os.urandom(2), "little") / 2.0**UNIFORM_BITS])
    rank = comm.get().get_rank()
    u_server = crypten.cryptensor(mine if rank == rank_server else torch.zeros(1), src=rank_server)
    u_client = crypten.cryptensor(mine if rank == rank_client else torch.zeros(1), src=rank_client)
    s = u_server + u_client  # in [0, 2)
    return s - (s >= 1.0)


def inverse_cdf_index(x, u):
    """Shares of the index i drawn from softmax(x) (1-D) by the inverse CDF
    at u: the number of cumulative probabilities below u, over all but the
    last entry (so the index is at most len(x) - 1 however the fixed-point
    sum rounds). Costs a softmax and len(x) - 1 comparisons."""
    p = softmax(x, exp_iterations=SAMPLE_EXP_ITERATIONS)
    cdf = p.cumsum(0)
    return (cdf[:-1] < u).sum()


def sample_reveal(x, dst: int, rank_server: int, rank_client: int):
    """A token drawn from softmax(x), opened to rank `dst` only (the int there,
    None at the other party); the probabilities stay shared."""
    value = inverse_cdf_index(x, joint_uniform(rank_server, rank_client)).get_plain_text(dst=dst)
    if value is None:
        return None
    return int(round(float(value)))
