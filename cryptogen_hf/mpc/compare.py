"""Sign of a secret-shared value with few AND gates (every comparison).

CrypTen's ``x < 0`` converts x's two arithmetic shares to binary shares and
adds them with a 64-bit Kogge-Stone adder: 13 AND operations on 64-bit
words, i.e. 832 AND gates per compared value, although only the top bit of
the sum is used. Without a dealer every AND gate costs HE work
(:mod:`cryptogen_hf.mpc.two_party`), so here the top bit is computed
directly:

    x = s0 + s1 (mod 2**64), s0 the server's share, s1 the client's
    msb(x) = s0[63] XOR s1[63] XOR carry into bit 63 of s0[0:63] + s1[0:63]

The carry is the "generate" signal of the whole low 63-bit range, found by a
tree over (generate, propagate) pairs: leaves g_i = s0[i] AND s1[i],
p_i = s0[i] XOR s1[i] (free); a pair of adjacent ranges combines as
G = G_hi XOR (P_hi AND G_lo), P = P_hi AND P_lo (the two terms of G are never
both 1, so XOR is OR). The range holding bit 0 never needs its P. That is
63 + 118 = 181 AND gates and 7 rounds per value, packed 64 to a word across
values, then one B2A round.

Narrower comparisons: shares mod 2**64 reduced mod 2**k are shares of
x mod 2**k, and when |x| < 2**(k-1) the top bit of that k-bit value is the
sign of x. So a caller that knows such a bound (activations, attention
scores: :data:`ACTIVATION_BITS`) passes ``bits=k`` and the carry chain is
k - 1 bits long (k = 36: 97 AND gates). The bound is on the fixed-point
encoding, i.e. |value| < 2**(k - 1 - 16) for CrypTen's 16 fractional bits.

Coarse comparisons: a caller that only needs the sign of values away from
zero passes ``ignore_low_bits=L``: the L low bits of each share are dropped
and the carry out of them taken as 0. Then floor(s0 / 2**L) + floor(s1 / 2**L)
= floor(x / 2**L) - c with c in {0, 1}, whose sign is x's except when
0 <= x < 2**L, where [x < 0] may read 1. The error is one-sided and confined
to [0, 2**(L - 16)) in value units; the chain is L bits shorter (k = 36,
L = 12: 63 AND gates instead of 97). GELU's cut and the softmax max use it
(:mod:`cryptogen_hf.mpc.ops` says why each tolerates it).
"""

from __future__ import annotations

import torch

from cryptogen_hf.crypten_compat import import_crypten

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402
from crypten.encoder import FixedPointEncoder  # noqa: E402
from crypten.mpc.primitives import BinarySharedTensor  # noqa: E402
from crypten.mpc.primitives.beaver import B2A_single_bit  # noqa: E402

RING_BITS = 64
# Width for comparing activations and attention scores: |value| < 2**19 (the
# fixed-point encoding below 2**35), far above anything a trained model makes.
ACTIVATION_BITS = 36
_SHIFTS = torch.arange(64, dtype=torch.long)


def _bits(words: torch.Tensor, n_bits: int) -> torch.Tensor:
    """(n,) int64 -> (n, n_bits) 0/1, least significant first."""
    return (words.reshape(-1, 1) >> _SHIFTS[:n_bits]) & 1


def _and_bits(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """XOR shares of x AND y for XOR-shared 0/1 arrays of any shape: the bits
    are packed 64 to a word for CrypTen's Beaver AND (one round)."""
    shape, n = x.shape, x.numel()
    pad = (-n) % 64
    packed = []
    for bits in (x, y):
        flat = torch.cat([bits.reshape(-1), torch.zeros(pad, dtype=torch.long)]).reshape(-1, 64)
        packed.append(BinarySharedTensor.from_shares((flat << _SHIFTS).sum(-1)))
    z = (packed[0] & packed[1]).share
    return _bits(z, 64).reshape(-1)[:n].reshape(shape)


def _carry_tree(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(n, m) XOR shares of generate/propagate per bit range (lowest first)
    -> (n,) shares of the generate signal of the whole range."""
    while g.size(1) > 1:
        m = g.size(1)
        pairs = m // 2
        g_lo, g_hi = g[:, 0 : 2 * pairs : 2], g[:, 1 : 2 * pairs : 2]
        p_lo, p_hi = p[:, 0 : 2 * pairs : 2], p[:, 1 : 2 * pairs : 2]
        # One round for both products; the lowest pair's P is never needed.
        left = torch.cat([p_hi, p_hi[:, 1:]], dim=1)
        right = torch.cat([g_lo, p_lo[:, 1:]], dim=1)
        prod = _and_bits(left, right)
        new_g = g_hi ^ prod[:, :pairs]
        new_p = torch.cat([torch.zeros_like(p_hi[:, :1]), prod[:, pairs:]], dim=1)
        if m % 2:  # the top range has no partner at this level
            new_g = torch.cat([new_g, g[:, -1:]], dim=1)
            new_p = torch.cat([new_p, p[:, -1:]], dim=1)
        g, p = new_g, new_p
    return g[:, 0]


def ltz(x, bits: int = RING_BITS, ignore_low_bits: int = 0):
    """[x < 0] for an arithmetic MPCTensor x whose fixed-point encoding is
    below 2**(bits - 1) in magnitude, as an arithmetic MPCTensor of 0/1 with
    encoder scale 1 (what CrypTen's ``MPCTensor._ltz`` returns). With
    ``ignore_low_bits=L`` the result may also read 1 where the encoding is
    in [0, 2**L) (module docstring)."""
    from crypten.mpc.ptype import ptype as Ptype

    if comm.get().get_world_size() != 2:
        raise RuntimeError("cryptogen_hf's comparison is written for exactly two parties")
    if not 2 <= bits <= RING_BITS:
        raise ValueError(f"comparison width must be in 2..{RING_BITS} bits, got {bits}")
    if not 0 <= ignore_low_bits < bits - 1:
        raise ValueError(f"ignore_low_bits must be in 0..{bits - 2} for a {bits}-bit comparison, got {ignore_low_bits}")
    low = bits - 1 - ignore_low_bits
    share = x._tensor.share
    shape = share.shape
    # This party's share bits ignore_low_bits .. bits - 1 (its XOR share of s0[i] / s1[i]).
    mine = _bits(share, bits)[:, ignore_low_bits:]
    rank = comm.get().get_rank()
    zero = torch.zeros_like(mine[:, :low])
    # AND of the server's bit and the client's bit: inputs shared as (s0, 0) and (0, s1).
    server_bits = mine[:, :low] if rank == 0 else zero
    client_bits = mine[:, :low] if rank == 1 else zero
    g = _and_bits(server_bits, client_bits)
    carry = _carry_tree(g, mine[:, :low])
    sign = BinarySharedTensor.from_shares((mine[:, low] ^ carry).reshape(shape))
    result = x.clone()
    result._tensor = B2A_single_bit(sign)
    result.ptype = Ptype.arithmetic
    result.encoder = FixedPointEncoder(precision_bits=0)
    return result


def ge_zero(x, bits: int = RING_BITS, ignore_low_bits: int = 0):
    """[x >= 0], same contract as :func:`ltz` (may read 0 on [0, 2**L))."""
    return 1 - ltz(x, bits, ignore_low_bits)
