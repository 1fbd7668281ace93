"""Cryptographic randomness for masks (os.urandom, never a seeded PRNG).

Masks hide activations from the other party, so they come from the OS CSPRNG.
Uniformity matters: a mask in Z_p drawn as ``uint64 % p`` would be biased by
about p / 2**64, so we reject the top partial block instead.
"""

from __future__ import annotations

import os

import numpy as np


def uniform_ring64(n: int) -> np.ndarray:
    """n uniform elements of Z_{2^64}, as int64 (two's complement)."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.int64).copy()


def uniform_mod(p: int, n: int) -> np.ndarray:
    """n uniform elements of Z_p (p < 2^63), as uint64, by rejection sampling."""
    if not 1 < p < (1 << 63):
        raise ValueError(f"modulus {p} out of range for 64-bit masks")
    limit = np.uint64(((1 << 64) // p) * p)  # largest multiple of p that fits, exclusive bound
    out = np.empty(n, dtype=np.uint64)
    filled = 0
    while filled < n:
        # Draw a little extra: the rejection rate is below 2^-22 for our p, so one pass almost always suffices.
        draw = np.frombuffer(os.urandom(8 * (n - filled + 8)), dtype=np.uint64)
        keep = draw[draw < limit][: n - filled]
        out[filled : filled + len(keep)] = keep % np.uint64(p)
        filled += len(keep)
    return out
