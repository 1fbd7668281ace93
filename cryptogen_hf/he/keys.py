"""Client and server HE objects.

ClientHE: makes the keys, holds the secret key, encrypts/decrypts slot vectors.
ServerHE: built from `ClientHE.public_bundle()` only; it can encrypt (public
key), evaluate, relinearize and rotate by the steps the client granted, but
it never sees the secret key.

SEAL's Python binding (tenseal.sealapi) serializes through file paths, so the
byte-level helpers go through a private temporary file in /dev/shm (memory).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time

import numpy as np
import tenseal.sealapi as sealapi

from .noise import NoiseModel
from .params import HEParams

_TMPDIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
_BUNDLE_MAGIC = b"CGHEPUB1"


class CiphertextError(ValueError):
    """Raised when serialized ciphertext bytes are corrupted, truncated or not for this context."""


def _save_bytes(obj) -> bytes:
    fd, path = tempfile.mkstemp(dir=_TMPDIR, prefix="cghe")
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _load_into(obj, context, data: bytes):
    fd, path = tempfile.mkstemp(dir=_TMPDIR, prefix="cghe")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if context is None:
            obj.load(path)
        else:
            obj.load(context, path)
    finally:
        os.unlink(path)
    return obj


def _pack_blobs(header: dict, blobs: list[bytes]) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    out = [_BUNDLE_MAGIC, struct.pack("<I", len(head)), head, struct.pack("<I", len(blobs))]
    for b in blobs:
        out.append(struct.pack("<Q", len(b)))
        out.append(b)
    return b"".join(out)


def _unpack_blobs(data: bytes) -> tuple[dict, list[bytes]]:
    if not data.startswith(_BUNDLE_MAGIC):
        raise ValueError("not a CryptoGen HE public bundle (bad magic)")
    off = len(_BUNDLE_MAGIC)
    (hlen,) = struct.unpack_from("<I", data, off)
    off += 4
    header = json.loads(data[off : off + hlen])
    off += hlen
    (nblobs,) = struct.unpack_from("<I", data, off)
    off += 4
    blobs = []
    for _ in range(nblobs):
        (blen,) = struct.unpack_from("<Q", data, off)
        off += 8
        if off + blen > len(data):
            raise ValueError("HE public bundle is truncated")
        blobs.append(data[off : off + blen])
        off += blen
    return header, blobs


class _HEBase:
    """What client and server share: context, encoder, evaluator, slot helpers."""

    def __init__(self, params: HEParams):
        self.params = params
        self.context = params.make_context()
        self.encoder = sealapi.BatchEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.p = params.plain_modulus
        self.slot_count = params.slot_count
        self.row_size = params.row_size
        # Plaintexts in NTT form must carry the parms_id of the level the
        # ciphertexts live at: the first data level (the server computes
        # there; only results on their way to the client are mod-switched).
        self.parms_id = self.context.first_parms_id()
        self.result_parms_id = result_parms_id(self.context, self.p)
        # The level of the ciphertexts this party receives (the server: the
        # client's uploads; the client: results, see ClientHE).
        self.received_parms_id = self.parms_id

    # -- slot vectors ------------------------------------------------------
    def to_slots(self, values) -> list[int]:
        """Reduce an int array mod p (negatives -> p - |x|), zero-pad to N slots."""
        v = np.asarray(values)
        if v.ndim != 1 or v.size > self.slot_count:
            raise ValueError(f"expected a 1-D array of at most {self.slot_count} slot values, got shape {v.shape}")
        if v.dtype == np.uint64:
            red = v % np.uint64(self.p)
        else:
            red = np.mod(v.astype(np.int64), self.p).astype(np.uint64)
        out = np.zeros(self.slot_count, dtype=np.uint64)
        out[: red.size] = red
        return out.tolist()

    def encode(self, values) -> sealapi.Plaintext:
        pt = sealapi.Plaintext()
        self.encoder.encode(self.to_slots(values), pt)
        return pt

    def encode_ntt(self, values) -> sealapi.Plaintext:
        """Encode and move to NTT form once, so each later ct x pt is a pointwise product."""
        pt = self.encode(values)
        self.evaluator.transform_to_ntt_inplace(pt, self.parms_id)
        return pt

    # -- ciphertext helpers -----------------------------------------------
    def copy(self, ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        # sealapi has no copy constructor: two negations are the cheapest copy.
        out = sealapi.Ciphertext()
        self.evaluator.negate(ct, out)
        self.evaluator.negate_inplace(out)
        return out

    def to_ntt(self, ct) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.transform_to_ntt(ct, out)
        return out

    def serialize_ct(self, ct: sealapi.Ciphertext) -> bytes:
        return _save_bytes(ct)

    def load_ct(self, data: bytes) -> sealapi.Ciphertext:
        """Deserialize with full validation; a clear CiphertextError on bad bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 16:
            raise CiphertextError(f"ciphertext bytes too short ({len(data) if data is not None else 0} bytes)")
        ct = sealapi.Ciphertext()
        try:
            _load_into(ct, self.context, bytes(data))
        except Exception as e:  # SEAL raises on bad header, size mismatch, decompression error
            raise CiphertextError(f"corrupted or truncated ciphertext ({len(data)} bytes): {e}") from e
        # SEAL's load checks metadata; check the data as well (coefficients < q_i).
        if not sealapi.is_metadata_valid_for(ct, self.context) or not sealapi.is_valid_for(ct, self.context):
            raise CiphertextError("ciphertext is not valid for this HE context (parameter mismatch or corrupted data)")
        if ct.parms_id() != self.received_parms_id:
            raise CiphertextError("ciphertext is at an unexpected modulus level")
        return ct

    def add_plain(self, ct, slots) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.add_plain(ct, self.encode(slots), out)
        return out

    def sub_plain(self, ct, slots) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.sub_plain(ct, self.encode(slots), out)
        return out

    def rotate_rows(self, ct, step: int) -> sealapi.Ciphertext:
        """Rotate both rows left by `step` (slot s receives slot s + step)."""
        out = sealapi.Ciphertext()
        if step % self.row_size == 0:
            return self.copy(ct)
        self.evaluator.rotate_rows(ct, step, self.galois_keys, out)
        return out

    def rotate_columns(self, ct) -> sealapi.Ciphertext:
        """Swap the two rows (Galois step 0 in SEAL's step convention)."""
        out = sealapi.Ciphertext()
        self.evaluator.rotate_columns(ct, self.galois_keys, out)
        return out

    def galois_elements(self, steps) -> list[int]:
        """SEAL's step -> Galois element map (the binding only takes elements).

        Row rotation left by s is X -> X^(3^s mod 2N); a negative step is
        N/2 - |s|; step 0 means the column rotation (swap rows), X -> X^(2N-1).
        """
        m = 2 * self.slot_count
        elts = []
        for s in steps:
            if s == 0:
                elts.append(m - 1)
                continue
            if abs(s) >= self.row_size:
                raise ValueError(f"rotation step {s} out of range for row size {self.row_size}")
            e = s if s > 0 else self.row_size + s
            elts.append(pow(3, e, m))
        return sorted(set(elts))

    def ct_nbytes(self, ct) -> int:
        # Uncompressed in-memory size: size x (#primes) x N x 8 bytes.
        return ct.size() * ct.coeff_modulus_size() * ct.poly_modulus_degree() * 8


# A result goes to the client at the lowest level whose Delta = q / p is at
# least 2**40: decryption then stays exact with room to spare (the flooded
# noise scales to at most Delta / 4; mod switching adds at most N of rounding
# noise), and every prime dropped is a third less to send at N = 8192.
RESULT_MIN_DELTA_BITS = 40


def result_parms_id(context, plain_modulus: int):
    """The level results are sent at (see RESULT_MIN_DELTA_BITS)."""
    data = context.first_context_data()
    while True:
        lower = data.next_context_data()
        if lower is None:
            return data.parms_id()
        q = 1
        for prime in lower.parms().coeff_modulus():
            q *= prime.value()
        if (q // plain_modulus).bit_length() - 1 < RESULT_MIN_DELTA_BITS:
            return data.parms_id()
        data = lower


def ciphertext_size_limit(params: HEParams) -> int:
    """The most bytes one serialized fresh ciphertext takes: two polynomials at
    every prime, plus 1 KiB for SEAL's header (compression only makes it smaller)."""
    return 2 * len(params.coeff_modulus) * params.poly_modulus_degree * 8 + 1024


def bundle_size_limit(params: HEParams, n_galois_steps: int) -> int:
    """The most bytes a public bundle for these parameters and this many
    Galois steps can take (SEAL's compression only makes it smaller): a
    public key (2 polynomials) and 1 + n_galois_steps key-switching keys,
    each (#primes - 1) pairs of polynomials at the key level, plus 1 MiB for
    headers and the noise model."""
    k, n = len(params.coeff_modulus), params.poly_modulus_degree
    poly = k * n * 8
    return 2 * poly + (1 + n_galois_steps) * (k - 1) * 2 * poly + (1 << 20)


class ClientHE(_HEBase):
    """Key owner. Generates secret/public/relin keys; Galois keys on request."""

    def __init__(self, params: HEParams | None = None):
        super().__init__(params or HEParams())
        self.keygen = sealapi.KeyGenerator(self.context)
        self._secret_key = self.keygen.secret_key()
        self.public_key = sealapi.PublicKey()
        self.keygen.create_public_key(self.public_key)
        self.relin_keys = sealapi.RelinKeys()
        self.keygen.create_relin_keys(self.relin_keys)
        self.encryptor = sealapi.Encryptor(self.context, self.public_key)
        self._symmetric_encryptor = sealapi.Encryptor(self.context, self._secret_key)
        self.decryptor = sealapi.Decryptor(self.context, self._secret_key)
        # The client receives only results, which the server mod-switches (ServerHE.mask_for_client).
        self.received_parms_id = self.result_parms_id
        self._galois_steps: tuple = ()
        self.galois_keys = None
        self._noise_model: NoiseModel | None = None

    def encrypt(self, values) -> sealapi.Ciphertext:
        ct = sealapi.Ciphertext()
        self.encryptor.encrypt(self.encode(values), ct)
        return ct

    def encrypt_serialized(self, values) -> bytes:
        """An encryption to send to the server, serialized: symmetric (secret
        key) and seeded, so c1, a uniform polynomial, travels as the seed SEAL
        expands it from: half the bytes of a public-key ciphertext. The
        server's load expands it; its noise is below a public-key encryption's."""
        return _save_bytes(self._symmetric_encryptor.encrypt_symmetric(self.encode(values)))

    def decrypt(self, ct) -> np.ndarray:
        pt = sealapi.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return np.asarray(self.encoder.decode_uint64(pt), dtype=np.uint64)

    def decrypt_centered(self, ct) -> np.ndarray:
        """Slots as signed ints in (-p/2, p/2] (for tests and the client's own use)."""
        v = self.decrypt(ct).astype(np.int64)
        return np.where(v > self.p // 2, v - self.p, v)

    def noise_budget(self, ct) -> int:
        return self.decryptor.invariant_noise_budget(ct)

    def make_galois_keys(self, steps) -> sealapi.GaloisKeys:
        steps = sorted({int(s) for s in steps})
        gk = sealapi.GaloisKeys()
        self.keygen.create_galois_keys(self.galois_elements(steps), gk)
        self._galois_steps = tuple(steps)
        self.galois_keys = gk
        return gk

    @property
    def noise_model(self) -> NoiseModel:
        if self._noise_model is None:
            self._noise_model = NoiseModel.calibrate(self)
        return self._noise_model

    def public_bundle(self, galois_steps) -> bytes:
        """Everything the server needs, nothing it must not have.

        Contents: params, public key, relin keys, Galois keys for exactly the
        requested rotation steps, and the calibrated noise model. The secret
        key is never serialized here.
        """
        steps = sorted({int(s) for s in galois_steps})
        if steps and tuple(steps) == self._galois_steps:
            gk = self.galois_keys  # made already (make_galois_keys): not twice
        else:
            gk = sealapi.GaloisKeys()
            if steps:
                self.keygen.create_galois_keys(self.galois_elements(steps), gk)
        header = {
            "params": self.params.to_dict(),
            "fingerprint": self.params.fingerprint(),
            "galois_steps": steps,
            "noise_model": self.noise_model.to_dict(),
        }
        blobs = [_save_bytes(self.public_key), _save_bytes(self.relin_keys), _save_bytes(gk) if steps else b""]
        return _pack_blobs(header, blobs)

    def secret_key_bytes(self) -> bytes:
        """For tests only (proving the bundle does not contain it)."""
        return _save_bytes(self._secret_key)


class ServerHE(_HEBase):
    """Evaluator side: public key, relin keys, granted Galois keys. No secret key."""

    def __init__(self, params, public_key, relin_keys, galois_keys, galois_steps, noise_model):
        super().__init__(params)
        self.public_key = public_key
        self.relin_keys = relin_keys
        self.galois_keys = galois_keys
        self.galois_steps = tuple(galois_steps)
        self.encryptor = sealapi.Encryptor(self.context, public_key)
        self.noise_model = noise_model
        from .flooding import NoiseFlooder  # (flooding builds on this module's serialisation)

        self.flooder = NoiseFlooder(self.context, self.p)
        self.masking_s = 0.0  # time spent in mask_for_client: the cost of circuit privacy

    @classmethod
    def from_bundle(cls, data: bytes, expect_fingerprint: str | None = None) -> "ServerHE":
        """The server's HE from the client's public bundle. With
        ``expect_fingerprint`` (the server's own parameters), a bundle for
        other parameters is refused from its header, before any SEAL object
        is built from it."""
        header, blobs = _unpack_blobs(data)
        if expect_fingerprint is not None and header.get("fingerprint") != expect_fingerprint:
            raise ValueError("HE bundle parameters differ from the handshake")
        params = HEParams.from_dict(header["params"])
        if params.fingerprint() != header["fingerprint"]:
            raise ValueError("HE bundle fingerprint does not match its parameters")
        ctx = params.make_context()
        pk = _load_into(sealapi.PublicKey(), ctx, blobs[0])
        rk = _load_into(sealapi.RelinKeys(), ctx, blobs[1])
        gk = _load_into(sealapi.GaloisKeys(), ctx, blobs[2]) if blobs[2] else None
        for name, key in (("public key", pk), ("relin keys", rk), ("galois keys", gk)):
            if key is not None and not sealapi.is_valid_for(key, ctx):
                raise ValueError(f"{name} in the HE bundle are not valid for its parameters")
        return cls(params, pk, rk, gk, header["galois_steps"], NoiseModel.from_dict(header["noise_model"]))

    def encrypt(self, values) -> sealapi.Ciphertext:
        """Public-key encryption (e.g. of a server-side 0/1 mask or a zero)."""
        ct = sealapi.Ciphertext()
        self.encryptor.encrypt(self.encode(values), ct)
        return ct

    def mask_for_client(self, ct, slots) -> sealapi.Ciphertext:
        """ct + Enc_pk(slots) + flooding noise: how a result the server
        computed goes to the client for decryption. The fresh public-key
        encryption re-randomises c0 and c1; the noise, uniform up to Delta / 4,
        hides ct's own noise, which depends on the server's operands
        (he/flooding.py)."""
        from .flooding import RESULT_FLOOD_MARGIN_BITS

        start = time.perf_counter()
        out = self.encrypt(slots)
        self.evaluator.add_inplace(out, ct)
        self.evaluator.add_inplace(out, self.flooder.noise(os.urandom, self.flooder.flood_bits(RESULT_FLOOD_MARGIN_BITS)))
        # Then down to the result level (fewer primes, fewer bytes): a public
        # operation on the already flooded ciphertext, so it hides no less.
        self.evaluator.mod_switch_to_inplace(out, self.result_parms_id)
        self.masking_s += time.perf_counter() - start
        return out


class PlaintextEncoder(_HEBase):
    """Context, encoder and evaluator for a parameter set, with no keys at all.

    The server encodes its weights with it once at start-up, before any
    client has sent keys; plaintexts depend only on the parameters, so they
    work with every session's ``ServerHE`` of the same parameters.
    """
