"""BFV parameters for the HE half of CryptoGen.

One `HEParams` object fixes the ring (N), the plaintext modulus p (a batching
prime, p = 1 mod 2N, so that the N slots form a 2 x N/2 matrix) and the
ciphertext modulus q: a chain of primes whose total stays within SEAL's
128-bit bound under the HomomorphicEncryption.org standard (checked below).

Why four 54-56-bit primes at N = 8192 and not SEAL's BFVDefault (five primes
of 43-44 bits, the same 218 bits): every HE operation costs work per prime,
so one prime fewer makes rotations and plaintext products a third faster and
ciphertext products ~12 % faster (scripts/measure_noise.py --chains). The
price is ~12 bits of noise budget (data primes 162 bits instead of 174), and
the last prime, used only for key switching, stays the largest, as SEAL
recommends. Other ring sizes keep BFVDefault.

Why p ~ 2^44 (see scripts/measure_noise.py for the measurement): our largest
HE results are sums of 3072 products of two 13-14 bit fixed-point operands,
|y| < 2^(14+14+12) = 2^40, and the HE -> shares conversion needs |y| < p/4
(protocol/convert.py), so p must exceed 2^42. Every result the client
decrypts is noise-flooded (he/flooding.py), which needs noise budget: the
flooding hides a result with budget B up to 2**-(B - 1) per coefficient.
Each bit off p gives about two bits of budget (the bound q/p grows and the
plaintext products' noise, ~N p, shrinks). Measured at N = 8192 with the
4-prime chain, worst-case operands, budget after the deepest kernels
(3072x768 matvec; ct x ct attention): p = 2^50: 41 / 37 bits; p = 2^46:
49 / 44; p = 2^44: 53 / 49. So p = 2^44 keeps every result at >= 41 bits,
i.e. >= 40 bits of statistical hiding, with no change of ring. (N = 16384
would give 53+ bits at p = 2^50, at 2-4x the cost of every HE operation.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import tenseal.sealapi as sealapi

# SEAL's security table (HomomorphicEncryption.org standard) bounds log2(q)
# for a given N; BFVDefault() returns a chain inside that bound.
_SEC_LEVEL = sealapi.SEC_LEVEL_TYPE.TC128

# Prime sizes of the ciphertext modulus per ring size (see the module note);
# ring sizes not listed use SEAL's BFVDefault chain.
DEFAULT_COEFF_MODULUS_BITS = {8192: (54, 54, 54, 56)}


def check_coeff_modulus_bits(bits) -> list[int]:
    """The prime sizes SEAL can make (20..60 bits each), at least two primes
    (one for data, one for key switching); raises ValueError naming the sizes."""
    if not isinstance(bits, (list, tuple)) or len(bits) < 2 or any(not isinstance(b, int) or not 20 <= b <= 60 for b in bits):
        raise ValueError(f"coeff modulus bits must be a list of >= 2 prime sizes in 20..60 bits, got {bits!r}")
    return list(bits)


@dataclass
class HEParams:
    poly_modulus_degree: int = 8192
    plain_modulus_bits: int = 44
    # Bit sizes of the ciphertext modulus primes; None -> DEFAULT_COEFF_MODULUS_BITS.
    coeff_modulus_bits: tuple[int, ...] | None = None
    # Filled in __post_init__ unless given explicitly (e.g. when rebuilding
    # the exact parameters received in a handshake).
    plain_modulus: int | None = None
    coeff_modulus: list[int] = field(default_factory=list)

    def __post_init__(self):
        n = self.poly_modulus_degree
        if n & (n - 1) or n < 1024:
            raise ValueError(f"poly_modulus_degree must be a power of two >= 1024, got {n}")
        if self.plain_modulus is None:
            self.plain_modulus = sealapi.PlainModulus.Batching(n, self.plain_modulus_bits).value()
        if self.plain_modulus % (2 * n) != 1:
            raise ValueError(f"plain modulus {self.plain_modulus} is not a batching prime (p = 1 mod 2N)")
        self.plain_modulus_bits = self.plain_modulus.bit_length()
        if not self.coeff_modulus:
            self.coeff_modulus = self._make_coeff_modulus(n, self.coeff_modulus_bits)
        self.coeff_modulus_bits = tuple(q.bit_length() for q in self.coeff_modulus)
        self.check_security()

    @staticmethod
    def _make_coeff_modulus(n: int, bits) -> list[int]:
        bits = bits or DEFAULT_COEFF_MODULUS_BITS.get(n)
        if bits is None:
            return [m.value() for m in sealapi.CoeffModulus.BFVDefault(n, _SEC_LEVEL)]
        bits = check_coeff_modulus_bits(bits)
        # Create() picks distinct primes = 1 mod 2N of exactly these sizes.
        return [m.value() for m in sealapi.CoeffModulus.Create(n, bits)]

    # ------------------------------------------------------------------ checks
    @property
    def coeff_modulus_total_bits(self) -> int:
        return sum(q.bit_length() for q in self.coeff_modulus)

    def check_security(self) -> None:
        """Refuse parameter sets below 128-bit security.

        SEAL's MaxBitCount(N, tc128) is the largest total log2(q) that keeps
        128-bit security for this N; a larger q makes the lattice easier.
        """
        max_bits = sealapi.CoeffModulus.MaxBitCount(self.poly_modulus_degree, _SEC_LEVEL)
        if self.coeff_modulus_total_bits > max_bits:
            raise ValueError(
                f"coeff modulus of {self.coeff_modulus_total_bits} bits exceeds {max_bits} bits, "
                f"the 128-bit security bound for N={self.poly_modulus_degree}"
            )
        if self.plain_modulus_bits >= min(q.bit_length() for q in self.coeff_modulus[:-1]) + 20:
            raise ValueError("plain modulus too large for this coefficient modulus (no noise budget left)")

    # ---------------------------------------------------------------- context
    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree

    @property
    def row_size(self) -> int:
        # Batching slots form a 2 x (N/2) matrix; rotate_rows acts on each row.
        return self.poly_modulus_degree // 2

    def encryption_parameters(self) -> sealapi.EncryptionParameters:
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(self.poly_modulus_degree)
        parms.set_coeff_modulus([sealapi.Modulus(q) for q in self.coeff_modulus])
        parms.set_plain_modulus(sealapi.Modulus(self.plain_modulus))
        return parms

    def make_context(self) -> sealapi.SEALContext:
        # expand_mod_chain=True, and SEAL re-checks the security level itself.
        ctx = sealapi.SEALContext(self.encryption_parameters(), True, _SEC_LEVEL)
        if not ctx.parameters_set():
            raise ValueError(f"SEAL rejected the parameters: {ctx.parameters_error_message()}")
        return ctx

    def fingerprint(self) -> str:
        """Stable identifier of the parameter set, for handshakes."""
        text = f"bfv|N={self.poly_modulus_degree}|p={self.plain_modulus}|q={','.join(map(str, self.coeff_modulus))}|tc128"
        return "bfv-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "plain_modulus": self.plain_modulus,
            "coeff_modulus": list(self.coeff_modulus),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HEParams":
        return cls(
            poly_modulus_degree=int(d["poly_modulus_degree"]),
            plain_modulus=int(d["plain_modulus"]),
            coeff_modulus=[int(q) for q in d["coeff_modulus"]],
        )
