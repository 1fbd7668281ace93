"""Server-side noise-budget bookkeeping.

The server cannot measure a ciphertext's noise budget (that needs the secret
key), so it keeps an *estimate*: a conservative per-operation cost model whose
constants the client measures once with its real `noise_budget()` and ships
in the public bundle (`NoiseModel.calibrate`). Every cost below is rounded up
and padded by `margin` bits so that estimate <= measured budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class NoiseModel:
    fresh: float  # budget of a fresh public-key encryption, lower bound
    mul_plain: float  # bits lost by one ct x pt with a full (uniform mod p) plaintext
    mul: float  # bits lost by one ct x ct (both fresh-like), before relin
    relin: float  # extra bits lost by relinearization
    rotate: float  # bits lost by one Galois automorphism (key switching)
    margin: float = 2.0
    # Bits by which the composed estimate of a decode attention kernel
    # (InnerKVCache) undershoots its measured budget, less the margin: the
    # per-op rules are worst cases (k addends cost log2 k, every rotation a
    # bit). Measured by the client for its model's shape at session set-up
    # (he/attention.py: calibrate_attention_slack); 0 until then.
    attention_slack: float = 0.0

    # -- analytic defaults (used before calibration): BFV noise growth ~
    # ct x pt: x N * p/2 ; ct x ct: x N * p ; key switching: small additive.
    @classmethod
    def default(cls, params) -> "NoiseModel":
        n_bits = math.log2(params.poly_modulus_degree)
        q_bits = sum(q.bit_length() for q in params.coeff_modulus[:-1])
        p_bits = params.plain_modulus_bits
        return cls(
            fresh=q_bits - p_bits - 12,
            mul_plain=n_bits + p_bits + 2,
            mul=n_bits + p_bits + 6,
            relin=2.0,
            rotate=2.0,
        )

    @classmethod
    def calibrate(cls, client, trials: int = 2, margin: float = 2.0) -> "NoiseModel":
        """Measure the per-op costs with the client's secret key (client side)."""
        p = client.params.plain_modulus
        n = client.params.slot_count
        rng = np.random.default_rng(12345)
        fresh, d_pt, d_ct, d_rel, d_rot = [], [], [], [], []
        ev = client.evaluator
        import tenseal.sealapi as sealapi

        galois = sealapi.GaloisKeys()
        client.keygen.create_galois_keys(client.galois_elements([1]), galois)
        for _ in range(trials):
            a = client.encrypt(rng.integers(0, p, n, dtype=np.uint64))
            b = client.encrypt(rng.integers(0, p, n, dtype=np.uint64))
            f = min(client.noise_budget(a), client.noise_budget(b))
            fresh.append(f)
            pt = client.encode(rng.integers(0, p, n, dtype=np.uint64))
            c = sealapi.Ciphertext()
            ev.multiply_plain(a, pt, c)
            d_pt.append(f - client.noise_budget(c))
            c = sealapi.Ciphertext()
            ev.multiply(a, b, c)
            after_mul = client.noise_budget(c)
            d_ct.append(f - after_mul)
            ev.relinearize_inplace(c, client.relin_keys)
            after_rel = client.noise_budget(c)
            d_rel.append(after_mul - after_rel)
            r = sealapi.Ciphertext()
            ev.rotate_rows(c, 1, galois, r)
            d_rot.append(after_rel - client.noise_budget(r))
            r = sealapi.Ciphertext()
            ev.rotate_rows(a, 1, galois, r)
            d_rot.append(client.noise_budget(a) - client.noise_budget(r))
        return cls(
            fresh=min(fresh) - margin,
            mul_plain=max(d_pt) + margin,
            mul=max(d_ct) + margin,
            relin=max(max(d_rel), 0) + 1,
            rotate=max(max(d_rot), 0) + 1,
            margin=margin,
        )

    # -- composition rules, all conservative -------------------------------
    @staticmethod
    def add(*budgets: float) -> float:
        """Sum of k ciphertexts: noise adds up, at most log2(k) bits lost."""
        return min(budgets) - math.log2(len(budgets)) if len(budgets) > 1 else budgets[0]

    @staticmethod
    def sum_of(budget: float, k: int) -> float:
        return budget - (math.log2(k) if k > 1 else 0.0)

    def after_mul_plain(self, budget: float) -> float:
        return budget - self.mul_plain

    def after_mul(self, a: float, b: float) -> float:
        return min(a, b) - self.mul

    def after_relin(self, budget: float) -> float:
        return min(budget, self.fresh - self.rotate) - self.relin

    def after_rotate(self, budget: float, k: int = 1) -> float:
        # Key switching ADDS noise of about the size a rotated fresh ciphertext
        # carries: budget(n + e) >= min(budget(n), budget(e)) - 1.
        for _ in range(k):
            budget = min(budget, self.fresh - self.rotate) - 1
        return budget

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseModel":
        return cls(**d)
