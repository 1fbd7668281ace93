"""Random oblivious transfer by IKNP extension: the source of binary AND triples.

A random OT gives the sender two random bits (m0, m1) and the receiver a
random choice bit r and m_r, nothing more. Two of them, one in each
direction, make an AND triple (:func:`and_triples_from_ots`). Without a
dealer, AND triples are most of the correlated randomness a token needs
(every comparison is a carry tree of AND gates), and one BFV cross product
per AND gate cost 3.7 us; IKNP costs a few AES blocks and 16 bytes per OT.

IKNP (Ishai, Kilian, Nissim, Petrank, Crypto 2003), semi-honest, kappa = 128:

- Base OTs, once per session (:func:`base_ot_inputs`): the extension
  *receiver* holds kappa pairs of seeds (k_i^0, k_i^1); the extension
  *sender* holds kappa random bits s_i and learns k_i^{s_i} only. They come
  from the session's HE cross products (:mod:`cryptogen_hf.he.ole`): shares
  of s_i * (k_i^1 - k_i^0), and k_i^0 plus the sender's share (one message).
- Per batch of m OTs: G(k) is an AES-256-CTR stream (:class:`AESCounterPRG`),
  continued from batch to batch. The receiver draws its choice bits r and
  sends the kappa columns u_i = G(k_i^0) XOR G(k_i^1) XOR r (16 bytes per OT).
  The sender forms q_i = G(k_i^{s_i}) XOR s_i u_i = t_i XOR s_i r with
  t_i = G(k_i^0): row j of q is t_j XOR r_j s. So
  m0_j = H(j, q_j), m1_j = H(j, q_j XOR s), and the receiver's m_{r_j} = H(j, t_j).
  The sender's view (q) is t XOR (s_i r), with t pseudo-random unknown to it:
  it says nothing about r. The receiver does not know s, so H(j, t_j XOR s)
  (the message it did not choose) is pseudo-random to it.
- H is the tweakable correlation-robust hash from fixed-key AES (Guo, Katz,
  Wang, Weng, Yu, S&P 2020): H(j, x) = pi(pi(x) XOR j) XOR pi(x), pi = AES
  under a public fixed key; j is a counter that never repeats in a session.
  Only the low bit of H is used (the messages are bits).

Bit layout: a batch of m OTs is a kappa x m bit matrix stored as kappa
columns of m/8 bytes (bit j of a column = bit j % 8 of byte j // 8), and
as m rows of 16 bytes after :func:`transpose_columns`.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .prg import SEED_BYTES, AESCounterPRG

KAPPA = 128  # computational security parameter: base OTs, columns, row width in bits
ROW_BYTES = KAPPA // 8
# pi's key: public and fixed by design (the hash is secure in the ideal
# permutation model, for any key both parties know). The ASCII of a name.
_FIXED_KEY = b"cryptogen_hf IKNP tccr pi key 01"
_PI = Cipher(algorithms.AES(_FIXED_KEY), modes.ECB())


class OTError(ValueError):
    """An OT-extension message of the wrong size."""


# ---------------------------------------------------------------------------
# Bit matrices
# ---------------------------------------------------------------------------
def _transpose_8x8(words: np.ndarray) -> np.ndarray:
    """Transpose the 8x8 bit matrix in each uint64 (bit 8*row + col), in place
    style on a copy: three masked swaps of 1, 2 and 4-bit blocks."""
    x = words.copy()
    for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
        s, m = np.uint64(shift), np.uint64(mask)
        t = (x ^ (x >> s)) & m
        x ^= t ^ (t << s)
    return x


def transpose_columns(columns: np.ndarray) -> np.ndarray:
    """(KAPPA, m/8) uint8 columns -> (m, 16) uint8 rows: bit i of row j
    (bit i % 8 of byte i // 8) is bit j of column i."""
    kappa, n_bytes = columns.shape
    if kappa != KAPPA:
        raise ValueError(f"expected {KAPPA} columns, got {kappa}")
    # [row block rb, row r in block, byte c] -> [c, rb, r]: 8 bytes = one word
    # whose byte r holds column 8rb+r's bits 8c..8c+7.
    blocks = np.ascontiguousarray(columns.reshape(ROW_BYTES, 8, n_bytes).transpose(2, 0, 1))
    words = _transpose_8x8(blocks.view("<u8"))  # now byte b bit r: column 8rb+r, OT 8c+b
    out = words.view(np.uint8).reshape(n_bytes, ROW_BYTES, 8).transpose(0, 2, 1)
    return np.ascontiguousarray(out).reshape(8 * n_bytes, ROW_BYTES)


def hash_low_bits(rows: np.ndarray, first_index: int) -> np.ndarray:
    """Low bit of H(j, row_j) for j = first_index, first_index + 1, ...:
    (m, 16) uint8 -> (m,) uint8 of 0/1."""
    m = rows.shape[0]
    pi = _PI.encryptor()
    first = np.frombuffer(pi.update(rows.tobytes()), dtype="<u8").reshape(m, 2)
    tweaked = first.copy()
    tweaked[:, 0] ^= np.arange(first_index, first_index + m, dtype=np.uint64)
    second = np.frombuffer(pi.update(tweaked.tobytes()), dtype="<u8").reshape(m, 2)
    return ((second[:, 0] ^ first[:, 0]) & np.uint64(1)).astype(np.uint8)


def _check_batch(m: int) -> None:
    if m <= 0 or m % 8:
        raise ValueError(f"an OT batch is a positive multiple of 8 OTs, got {m}")


# ---------------------------------------------------------------------------
# Base OTs (from the session's HE cross products) and the two ends
# ---------------------------------------------------------------------------
LIMBS = SEED_BYTES // 8  # a 256-bit seed is 4 limbs of 64 bits


def seeds_to_limbs(seeds: np.ndarray) -> np.ndarray:
    """(KAPPA, 32) uint8 seeds -> (KAPPA, LIMBS) uint64."""
    return np.ascontiguousarray(seeds).view("<u8").reshape(KAPPA, LIMBS)


def limbs_to_seeds(limbs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(limbs.astype("<u8")).view(np.uint8).reshape(KAPPA, SEED_BYTES)


class OTExtensionReceiver:
    """The extension receiver: holds both seeds of every base OT."""

    def __init__(self, seeds0: np.ndarray, seeds1: np.ndarray, choice_prg: AESCounterPRG):
        self._g0 = [AESCounterPRG(bytes(k)) for k in seeds0]
        self._g1 = [AESCounterPRG(bytes(k)) for k in seeds1]
        self._choice_prg = choice_prg
        self._index = 0  # the hash tweak j of the next OT

    def extend(self, m: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        """m random OTs: (u, the message for the sender, KAPPA columns of m/8
        bytes; r, the choice bits, (m,) 0/1 uint8; m_r, the chosen bits, (m,))."""
        _check_batch(m)
        n_bytes = m // 8
        r_packed = np.frombuffer(self._choice_prg.random_bytes(n_bytes), dtype=np.uint8)
        t = np.empty((KAPPA, n_bytes), dtype=np.uint8)
        u = np.empty((KAPPA, n_bytes), dtype=np.uint8)
        for i in range(KAPPA):
            t[i] = np.frombuffer(self._g0[i].random_bytes(n_bytes), dtype=np.uint8)
            u[i] = t[i] ^ np.frombuffer(self._g1[i].random_bytes(n_bytes), dtype=np.uint8) ^ r_packed
        chosen = hash_low_bits(transpose_columns(t), self._index)
        self._index += m
        return u.tobytes(), np.unpackbits(r_packed, bitorder="little"), chosen


class OTExtensionSender:
    """The extension sender: holds s and the seed k_i^{s_i} of every base OT."""

    def __init__(self, s_bits: np.ndarray, chosen_seeds: np.ndarray):
        s_bits = np.asarray(s_bits, dtype=np.uint8)
        self._s_row = np.packbits(s_bits, bitorder="little")  # (16,)
        self._s_mask = (s_bits * np.uint8(0xFF)).reshape(KAPPA, 1)  # row i: 0xFF where s_i = 1
        self._g = [AESCounterPRG(bytes(k)) for k in chosen_seeds]
        self._index = 0

    def extend(self, u: bytes, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The sender's two bits (m0, m1), each (m,) 0/1 uint8, of m random
        OTs, from the receiver's message u (its KAPPA columns, as bytes)."""
        _check_batch(m)
        n_bytes = m // 8
        if len(u) != KAPPA * n_bytes:
            raise OTError(f"OT extension message of {len(u)} bytes for {m} OTs, expected {KAPPA * n_bytes}")
        u = np.frombuffer(u, dtype=np.uint8).reshape(KAPPA, n_bytes)
        q = np.empty((KAPPA, n_bytes), dtype=np.uint8)
        for i in range(KAPPA):
            q[i] = np.frombuffer(self._g[i].random_bytes(n_bytes), dtype=np.uint8)
        q ^= u & self._s_mask
        rows = transpose_columns(q)
        m0 = hash_low_bits(rows, self._index)
        m1 = hash_low_bits(rows ^ self._s_row, self._index)
        self._index += m
        return m0, m1


def and_triples_from_ots(sent: tuple[np.ndarray, np.ndarray], received: tuple[np.ndarray, np.ndarray]):
    """This party's XOR shares (a, b, c) of m AND triples, from its m OTs as
    sender (m0, m1) and its m OTs as receiver (r, m_r), the peer's in the
    opposite roles. With a = m0 XOR m1 and b = r on each side:
    m0 XOR m_r(peer) = r(peer) * (m0 XOR m1) = a_mine * b_peer, so
    c = a b XOR m0 XOR m_r holds this party's part of a_mine b_mine and of
    both cross terms: c_server XOR c_client = (a_s XOR a_c)(b_s XOR b_c)."""
    m0, m1 = sent
    r, m_r = received
    a = m0 ^ m1
    return a, r, (a & r) ^ m0 ^ m_r
