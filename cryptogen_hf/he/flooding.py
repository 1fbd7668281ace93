"""Circuit privacy: what a decrypting client may learn from a ciphertext the
server computed, beyond its plaintext, and how the server removes it.

A BFV result ciphertext (c0, c1) satisfies c0 + c1 s = Delta m + v. Its c1 and
its noise v are deterministic in the server's operands (weights, shares) and
in the client's encryption randomness, which the client knows: decrypting,
it reads v, a linear function of the weights. Before any such ciphertext goes
to the client, the server therefore

1. adds a fresh public-key encryption (of the mask it adds anyway, or of
   zero): c1 becomes uniform, independent of the computation;
2. adds (e, 0) with e uniform in [-2**b, 2**b) per coefficient. The client
   then reads v + e, within statistical distance |v| / 2**(b+1) per
   coefficient of e alone, whatever the server's operands.

b is as large as decryption allows: Delta / 2**margin (``flood_bits``).
So the hiding is set by the noise budget the computation left: a result
with budget B bits (|v| < Delta / 2**(B+1)) is hidden up to 2**-(B - margin)
per coefficient. ``he/ole.py`` (cross products: margin 6, ~2**71 above the
products' noise) and ``protocol/convert.py`` (the model's results) use it.

The noise ciphertext (e, 0) is built in SEAL's uncompressed format
(Ciphertext::save_members: parms_id, is_ntt_form, size, N, #primes, scale,
correction factor, then the coefficient array with its own header), which
SEAL's load validates; the Python binding has no other way to set c0.
"""

from __future__ import annotations

import struct

import numpy as np
import tenseal.sealapi as sealapi

from .keys import CiphertextError, _load_into, _save_bytes

_SEAL_MAGIC = b"\x5e\xa1\x10"  # SEALHeader: magic 0xA15E, header size 16

# The model's results (protocol/convert.py): flooding noise up to Delta / 4,
# so decryption stays exact while the computation's noise is below Delta / 4.
# A result with noise budget B is then hidden up to 2**-(B - 1) per
# coefficient; the server keeps every result it sends at B >= 41 (refreshing
# cache blocks before that), i.e. at least 40 bits.
RESULT_FLOOD_MARGIN_BITS = 2
RESULT_STATISTICAL_BITS = 40


# ---------------------------------------------------------------------------
# uint64 arithmetic mod primes below 2**62 (numpy has no 128-bit integers)
# ---------------------------------------------------------------------------
def mulmod(a: np.ndarray, b, m: int) -> np.ndarray:
    """a * b mod m for uint64 arrays with a, b < m < 2**62.

    The quotient comes from 64-bit-mantissa long doubles (off by at most 1);
    the remainder is computed exactly in wrapping uint64 arithmetic and
    corrected into [0, m)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    q = np.floor(a.astype(np.longdouble) * b.astype(np.longdouble) / np.longdouble(m)).astype(np.uint64)
    r = (a * b - q * np.uint64(m)).view(np.int64)
    r = np.where(r < 0, r + np.int64(m), r)
    r = np.where(r >= m, r - np.int64(m), r)
    return r.astype(np.uint64)


def limbs_mod(limbs: list[np.ndarray], m: int) -> np.ndarray:
    """(sum_k limbs[k] * 2**(64k)) mod m, limbs as uint64 arrays, m < 2**62."""
    m64 = np.uint64(m)
    out = limbs[0] % m64
    for k, limb in enumerate(limbs[1:], start=1):
        out = (out + mulmod(limb % m64, np.uint64(pow(2, 64 * k, m)), m)) % m64
    return out


# mulmod's quotient needs x86-64's 64-bit-mantissa long doubles: refuse elsewhere, at import.
if np.finfo(np.longdouble).nmant < 63:
    raise RuntimeError("HE flooding needs 64-bit-mantissa long doubles (x86-64); this platform has fewer bits")


def uniform_limbs(random_bytes, n: int, bits: int) -> list[np.ndarray]:
    """n integers uniform in [0, 2**bits), as 64-bit limbs (least significant
    first). ``random_bytes(k)``: k bytes from a cryptographic source (an
    AESCounterPRG's ``random_bytes``, or ``os.urandom``)."""
    n_limbs = -(-bits // 64)
    limbs = [np.frombuffer(random_bytes(8 * n), dtype=np.uint64).copy() for _ in range(n_limbs)]
    top = bits - 64 * (n_limbs - 1)
    if top < 64:
        limbs[-1] &= np.uint64((1 << top) - 1)
    return limbs


# ---------------------------------------------------------------------------
# Noise ciphertexts
# ---------------------------------------------------------------------------
def _seal_header(version: bytes, total_size: int) -> bytes:
    # magic, header size, version major/minor, compression none, reserved, total size
    return _SEAL_MAGIC + version + b"\x00\x00\x00" + struct.pack("<Q", total_size)


class NoiseFlooder:
    """Flooding noise for ciphertexts at the data level of one SEAL context."""

    def __init__(self, context, plain_modulus: int):
        self.context = context
        self.parms_id = context.first_parms_id()
        self.q_primes = [m.value() for m in context.first_context_data().parms().coeff_modulus()]
        self.n = context.first_context_data().parms().poly_modulus_degree()
        q = 1
        for prime in self.q_primes:
            q *= prime
        self.delta_bits = (q // plain_modulus).bit_length() - 1  # floor(log2 Delta)
        probe = sealapi.Ciphertext(context, self.parms_id, 2)
        self._seal_version = _save_bytes(probe)[3:5]

    def flood_bits(self, margin_bits: int, max_bits: int | None = None) -> int:
        """b with 2**b = Delta / 2**margin (capped at max_bits)."""
        bits = self.delta_bits - margin_bits
        return bits if max_bits is None else min(bits, max_bits)

    def noise_ciphertext(self, c0_words: np.ndarray) -> sealapi.Ciphertext:
        """The ciphertext (e, 0) for e given per prime ((#primes, N) uint64, in
        [0, q_i)): adding it to ct adds e to ct's c0 and nothing else."""
        k = len(self.q_primes)
        words = np.zeros((2, k, self.n), dtype="<u8")
        words[0] = c0_words
        data = words.tobytes()
        array = _seal_header(self._seal_version, 16 + 8 + len(data)) + struct.pack("<Q", words.size) + data
        body = (
            struct.pack("<4Q", *self.parms_id) + b"\x00" + struct.pack("<3Q", 2, self.n, k)
            + struct.pack("<d", 1.0) + struct.pack("<Q", 1) + array
        )
        blob = _seal_header(self._seal_version, 16 + len(body)) + body
        try:
            ct = _load_into(sealapi.Ciphertext(), self.context, blob)
        except Exception as exc:  # SEAL's load checks every field and coefficient
            raise CiphertextError(f"noise ciphertext refused by SEAL: {exc}") from exc
        if not sealapi.is_valid_for(ct, self.context):
            raise CiphertextError("noise ciphertext is not valid for its parameters")
        return ct

    def noise(self, random_bytes, bits: int) -> sealapi.Ciphertext:
        """(e, 0) with e uniform in [-2**bits, 2**bits) per coefficient."""
        E = uniform_limbs(random_bytes, self.n, bits + 1)
        c0 = np.stack([(limbs_mod(E, q) + np.uint64(q - pow(2, bits, q))) % np.uint64(q) for q in self.q_primes])
        return self.noise_ciphertext(c0)
