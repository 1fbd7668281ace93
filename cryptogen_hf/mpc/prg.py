"""The one pseudo-random generator behind every share, mask and correlation.

Why not torch's or numpy's generators: ``torch.Generator.manual_seed`` keeps
only the low 32 bits of a seed (a party that knows its own seed finds the
other's in 2^32 tries), and mt19937's whole state follows from 624 of its
outputs. CrypTen draws all of its randomness from such generators; the
compatibility module (:mod:`cryptogen_hf.crypten_compat`) replaces them with
this class.

:class:`AESCounterPRG` is AES-256 in counter mode (the ``cryptography``
package, i.e. OpenSSL): the keystream of a fresh 256-bit key from the OS is
indistinguishable from uniform bytes, and seeing any number of outputs says
nothing about the key or about later outputs. Each generator owns one key
and one running counter, so two generators with the same key (the pairwise
zero-sharing seeds) produce the same stream in the same order.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32  # AES-256 keys: 256-bit seeds, all of them from the OS


def new_seed() -> bytes:
    """A fresh 256-bit seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


class AESCounterPRG:
    """AES-256-CTR keystream as int64 tensors (uniform over the 64-bit ring)."""

    def __init__(self, seed: bytes | None = None):
        seed = new_seed() if seed is None else bytes(seed)
        if len(seed) != SEED_BYTES:
            raise ValueError(f"AESCounterPRG needs a {SEED_BYTES}-byte seed, got {len(seed)} bytes")
        # The nonce is fixed (zero): every key is used by one stream only.
        self._stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        self.device = torch.device("cpu")  # CrypTen reads generator.device

    def random_bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def ring_elements(self, size) -> torch.Tensor:
        """Uniform int64 tensor of the given size (every 64-bit pattern equally likely)."""
        size = torch.Size(size)
        n = size.numel()
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.int64)
        return torch.from_numpy(words.copy()).reshape(size)

    def kbit(self, size, bitlength: int) -> torch.Tensor:
        """Uniform values in [0, 2**bitlength) as int64 (bitlength <= 63), or the whole ring for 64."""
        if not 1 <= bitlength <= 64:
            raise ValueError(f"bitlength must be in 1..64, got {bitlength}")
        words = self.ring_elements(size)
        if bitlength == 64:
            return words
        return words & ((1 << bitlength) - 1)

    def below(self, bound: int, n: int) -> np.ndarray:
        """n values uniform in [0, bound) for 1 <= bound <= 2**63, by rejection
        (no modulo bias): uint64 array."""
        if not 1 <= bound <= 1 << 63:
            raise ValueError(f"bound must be in 1..2**63, got {bound}")
        bits = max(1, (bound - 1).bit_length())
        mask = np.uint64((1 << bits) - 1)
        out = np.empty(0, dtype=np.uint64)
        while out.size < n:
            need = n - out.size
            draw = np.frombuffer(self.random_bytes(8 * (need + need // 2 + 8)), dtype=np.uint64) & mask
            out = np.concatenate([out, draw[draw < np.uint64(bound)]])
        return out[:n]

    def __repr__(self):
        return "AESCounterPRG(AES-256-CTR, 256-bit key from the OS)"
