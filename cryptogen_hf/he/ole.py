"""Cross products by HE: the two-party source of Beaver triples (no dealer).

Every correlation CrypTen consumes (arithmetic triples, squares, binary AND
triples, B2A bits) is a sum of terms each party computes alone plus the
cross term ``x0*y1 + x1*y0``, where the server holds (x0, y0) and the client
(x1, y1). This module computes additive shares mod 2**64 of that cross term,
elementwise, with BFV:

    client -> server   Enc(x1), Enc(y1)                     (its own key)
    server -> client   Enc(x1*y0 + y1*x0 + R), re-randomised, noise-flooded,
                       then mod-switched to two of the three data primes
    client             z = decryption;  share_client = z mod 2**64
    server             share_server = -R mod 2**64

Two widths:

- ``wide`` (x, y any 64-bit words, read as unsigned): the cross term is < 2**129
  and R is uniform below 2**178 < T/2, T ~ 2**180 the product of four 45-bit
  batching primes (CRT, one context per prime): z = w + R never wraps mod T,
  and z hides w up to statistical distance 2**129 / 2**178 = 2**-49.
- ``narrow`` (x, y bits): w <= 2, one prime t > 2**44, R uniform below 2**43:
  statistical distance below 3 * 2**-43 < 2**-41. Used for AND triples (the
  parity of the shares is an XOR sharing of w mod 2) and B2A bits.

Circuit privacy (what the client learns from the ciphertext it decrypts,
beyond the plaintext): the result's c1 and its noise would otherwise be
deterministic functions of the server's x0, y0 and of the client's own
encryption randomness. The server therefore (1) adds a fresh public-key
encryption of R, which re-randomises both polynomials, and (2) adds to c0
noise uniform in [-2**b, 2**b), b = min(log2(Delta) - FLOOD_MARGIN_BITS,
FLOOD_MAX_BITS) = 127 here (Delta = q/t = 2**135): the noise the products
leave is below 2**56 (measured: tests/test_two_party.py), so the decrypted
noise is within statistical distance N * 2**-71 = 2**-58 of the flooding
distribution, whatever x0, y0 (he/flooding.py).

The ciphertexts travel in SEAL's serialisation; the receiver's load checks
the parameters and every coefficient (CiphertextError otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as sealapi

from .flooding import NoiseFlooder, limbs_mod, mulmod, uniform_limbs
from .keys import CiphertextError, _load_into, _save_bytes, result_parms_id
from .params import HEParams

STATISTICAL_BITS = 40  # every mask hides its value up to 2**-40 or better (checked below)
FLOOD_MARGIN_BITS = 6  # flooding noise stays at least 2**6 below Delta: decryption stays exact
FLOOD_MAX_BITS = 127  # two 64-bit limbs: 2**72 above the products' noise here (tests)


@dataclass(frozen=True)
class OLEParams:
    """Ring and moduli of the cross-product HE (separate from the model's HE)."""

    poly_modulus_degree: int = 8192
    # No key switching happens here, so the last (special) prime can be small.
    coeff_modulus_bits: tuple = (60, 60, 60, 38)
    plain_bits: int = 45
    n_primes: int = 4

    def he_params(self) -> list[HEParams]:
        primes = [m.value() for m in sealapi.PlainModulus.Batching(self.poly_modulus_degree, [self.plain_bits] * self.n_primes)]
        coeff = [m.value() for m in sealapi.CoeffModulus.Create(self.poly_modulus_degree, list(self.coeff_modulus_bits))]
        params = [HEParams(poly_modulus_degree=self.poly_modulus_degree, plain_modulus=t, coeff_modulus=coeff) for t in primes]
        product = 1
        for t in primes:
            product *= t
        if product.bit_length() - 2 - 129 < STATISTICAL_BITS + 8:
            raise ValueError(f"cross-product moduli of {product.bit_length()} bits leave less than {STATISTICAL_BITS} statistical bits")
        return params


class _PrimeContext:
    """One batching prime t: its SEAL context, encoder and evaluator."""

    def __init__(self, params: HEParams):
        self.params = params
        self.t = params.plain_modulus
        self.context = params.make_context()
        self.parms_id = self.context.first_parms_id()
        self.encoder = sealapi.BatchEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.n = params.slot_count
        self.flooder = NoiseFlooder(self.context, self.t)
        self.result_parms_id = result_parms_id(self.context, self.t)  # replies travel one prime lower

    def encode(self, values: np.ndarray) -> sealapi.Plaintext:
        pt = sealapi.Plaintext()
        self.encoder.encode((values % np.uint64(self.t)).tolist(), pt)
        return pt

    def save(self, ct) -> bytes:
        """SEAL's serialisation (of a ciphertext, or of a seeded symmetric one)."""
        return _save_bytes(ct)

    def load(self, blob: bytes, reply: bool = False):
        """A two-polynomial ciphertext, validated: at the data level of this
        context (an operand), or at the result level (``reply``: the server's)."""
        try:
            ct = _load_into(sealapi.Ciphertext(), self.context, bytes(blob))
        except Exception as exc:  # SEAL raises on bad headers, sizes, decompression
            raise CiphertextError(f"malformed cross-product ciphertext ({len(blob)} bytes): {exc}") from exc
        level = self.result_parms_id if reply else self.parms_id
        if ct.size() != 2 or ct.parms_id() != level or not sealapi.is_valid_for(ct, self.context):
            raise CiphertextError("cross-product ciphertext is not valid for its parameters")
        return ct

def flood_bits(pc: "_PrimeContext") -> int:
    return pc.flooder.flood_bits(FLOOD_MARGIN_BITS, FLOOD_MAX_BITS)


def _chunks(n: int, slots: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + slots)) for s in range(0, n, slots)]


def chunk_bounds(n: int, params: OLEParams | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each run of values that fills one ciphertext's slots."""
    return _chunks(n, (params or OLEParams()).poly_modulus_degree)


class OLEClient:
    """The client's side: owns the secret keys (one per prime), encrypts its
    operands, decrypts the server's answers and recombines them."""

    def __init__(self, params: OLEParams | None = None):
        self.params = params or OLEParams()
        self.primes = [_PrimeContext(p) for p in self.params.he_params()]
        self._keys = []
        for pc in self.primes:
            keygen = sealapi.KeyGenerator(pc.context)
            public_key = sealapi.PublicKey()
            keygen.create_public_key(public_key)
            secret_key = keygen.secret_key()
            # The client encrypts with its secret key: faster than public-key
            # encryption, and SEAL then sends c1 as a seed (half the bytes).
            self._keys.append((public_key, sealapi.Encryptor(pc.context, secret_key), sealapi.Decryptor(pc.context, secret_key)))
        moduli = [pc.t for pc in self.primes]
        self._T = int(np.prod([int(t) for t in moduli], dtype=object))
        # CRT constants: u_j = y_j * (T/t_j)^-1 mod t_j; z = sum u_j (T/t_j) - k T.
        self._crt_inv = [pow(self._T // t, -1, t) for t in moduli]
        self._crt_m_low = [np.uint64((self._T // t) % 2**64) for t in moduli]
        self._t_low = np.uint64(self._T % 2**64)

    def public_keys(self) -> list[bytes]:
        return [_save_bytes(pk) for pk, _, _ in self._keys]

    def n_primes(self, wide: bool) -> int:
        return len(self.primes) if wide else 1

    def encrypt(self, x: np.ndarray, y: np.ndarray, wide: bool) -> list[bytes]:
        """Enc(x), Enc(y) per chunk of N slots and per prime (x, y: uint64)."""
        out = []
        for start, stop in _chunks(x.size, self.primes[0].n):
            for pc, (_, encryptor, _) in zip(self.primes[: self.n_primes(wide)], self._keys):
                for operand in (x, y):
                    out.append(pc.save(encryptor.encrypt_symmetric(pc.encode(operand[start:stop]))))
        return out

    def decrypt(self, blobs: list[bytes], n: int, wide: bool) -> np.ndarray:
        """The client's share (uint64, mod 2**64) of the cross term."""
        k = self.n_primes(wide)
        chunks = _chunks(n, self.primes[0].n)
        if len(blobs) != len(chunks) * k:
            raise CiphertextError(f"expected {len(chunks) * k} cross-product results, got {len(blobs)}")
        share = np.empty(n, dtype=np.uint64)
        for c, (start, stop) in enumerate(chunks):
            residues = []
            for j, pc in enumerate(self.primes[:k]):
                pt = sealapi.Plaintext()
                self._keys[j][2].decrypt(pc.load(blobs[c * k + j], reply=True), pt)
                residues.append(np.asarray(pc.encoder.decode_uint64(pt), dtype=np.uint64)[: stop - start])
            share[start:stop] = self._recombine(residues) if wide else residues[0]
        return share

    def _recombine(self, residues: list[np.ndarray]) -> np.ndarray:
        """CRT: the integer z in [0, T) with these residues, reduced mod 2**64.
        z < T/2 + 2**129 by construction, so k = floor(sum u_j / t_j) is far
        from a rounding boundary in float64."""
        acc = np.zeros(residues[0].size, dtype=np.uint64)
        frac = np.zeros(residues[0].size, dtype=np.float64)
        for y, pc, inv, m_low in zip(residues, self.primes, self._crt_inv, self._crt_m_low):
            u = mulmod(y, np.uint64(inv), pc.t)
            acc = acc + u * m_low  # wraps mod 2**64, as intended
            frac += u.astype(np.float64) / float(pc.t)
        k = np.floor(frac).astype(np.uint64)
        return acc - k * self._t_low

    def noise_budget(self, blob: bytes, prime: int = 0, reply: bool = True) -> int:
        """For tests: the invariant noise budget of one result ciphertext
        (``reply=False``: of one the server's test control left at the data level)."""
        return self._keys[prime][2].invariant_noise_budget(self.primes[prime].load(blob, reply=reply))


class OLEServer:
    """The server's side: public keys only; multiplies, masks, re-randomises, floods."""

    def __init__(self, public_keys: list[bytes], params: OLEParams | None = None):
        self.params = params or OLEParams()
        self.primes = [_PrimeContext(p) for p in self.params.he_params()]
        if len(public_keys) != len(self.primes):
            raise CiphertextError(f"expected {len(self.primes)} cross-product public keys, got {len(public_keys)}")
        self._encryptors = []
        for pc, blob in zip(self.primes, public_keys):
            try:
                pk = _load_into(sealapi.PublicKey(), pc.context, bytes(blob))
            except Exception as exc:  # SEAL raises on any malformed key
                raise CiphertextError(f"malformed cross-product public key: {exc}") from exc
            if not sealapi.is_valid_for(pk, pc.context):
                raise CiphertextError("cross-product public key is not valid for its parameters")
            self._encryptors.append(sealapi.Encryptor(pc.context, pk))
        self._T = int(np.prod([pc.t for pc in self.primes], dtype=object))
        self.mask_bits_wide = self._T.bit_length() - 2  # R < 2**(log2 T - 1): z < T/2 + w
        self.mask_bits_narrow = self.primes[0].t.bit_length() - 2  # R < 2**43 < t - 3

    def n_primes(self, wide: bool) -> int:
        return len(self.primes) if wide else 1

    def evaluate(self, blobs: list[bytes], x0: np.ndarray, y0: np.ndarray, wide: bool, prg, flood: bool = True):
        """Enc(x1) * y0 + Enc(y1) * x0 + Enc(R), flooded. Returns (result
        ciphertexts, the server's share -R mod 2**64). ``prg``: the server's
        AESCounterPRG. ``flood=False`` exists only for the tests' control: the reply as the
        products leave it, at the data level (neither flooded nor switched)."""
        n = x0.size
        k = self.n_primes(wide)
        chunks = _chunks(n, self.primes[0].n)
        if len(blobs) != len(chunks) * k * 2:
            raise CiphertextError(f"expected {len(chunks) * k * 2} cross-product ciphertexts, got {len(blobs)}")
        R = uniform_limbs(prg.random_bytes, n, self.mask_bits_wide if wide else self.mask_bits_narrow)
        out = []
        for c, (start, stop) in enumerate(chunks):
            for j, pc in enumerate(self.primes[:k]):
                # Fresh Enc_pk(R): re-randomises the sum's c0 and c1, adds the mask.
                reply = sealapi.Ciphertext()
                self._encryptors[j].encrypt(pc.encode(limbs_mod([r[start:stop] for r in R], pc.t)), reply)
                for blob, operand in ((blobs[(c * k + j) * 2], y0), (blobs[(c * k + j) * 2 + 1], x0)):
                    ct = pc.load(blob)
                    plain = operand[start:stop] % np.uint64(pc.t)
                    if plain.any():  # SEAL refuses a product with the zero plaintext (it is zero anyway)
                        pc.evaluator.multiply_plain_inplace(ct, pc.encode(plain))
                        pc.evaluator.add_inplace(reply, ct)
                if flood:
                    pc.evaluator.add_inplace(reply, pc.flooder.noise(prg.random_bytes, flood_bits(pc)))
                    # Down to the result level (a third fewer bytes), after the flooding:
                    # a public operation on the flooded reply (keys.RESULT_MIN_DELTA_BITS).
                    pc.evaluator.mod_switch_to_inplace(reply, pc.result_parms_id)
                out.append(pc.save(reply))
        return out, np.uint64(0) - R[0]  # -R mod 2**64 is minus R's low limb
