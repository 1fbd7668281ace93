"""Noise budget left after each kernel, and the cost of the basic HE operations,
for plaintext moduli p of ~30, ~40, ~50 bits and for ciphertext-modulus chains.

Why: larger p = more fixed-point headroom, smaller p = more noise budget.
We need |results| < p/2 for sums of 3072 products of 13-14-bit operands
(~2^40) and pick the largest p that keeps >= 20 bits after the deepest kernel.
Fewer, larger primes in the chain make every operation cheaper for a little
less budget (he/params.py explains the chain we ship).
Usage: python scripts/measure_noise.py [--bits 50] [--chains default 43,43,44,44,44]
       [--ring 8192] [--out results/noise_budget.json]
"""

import argparse
import json
import os
import time

import numpy as np
import tenseal.sealapi as sealapi

from cryptogen_hf.he import ClientHE, MatvecPlan, HEParams, InnerKVCache, OuterAttentionPlan, OuterKVCache, ServerHE


def _time_ms(fn, repeats: int = 10) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def _op_times(cl, sv, p, rng) -> dict:
    """Milliseconds per ct x ct product, relinearization, rotation, ct x pt (NTT plaintext)."""
    a, b = (cl.encrypt(rng.integers(0, p, cl.params.slot_count, dtype=np.uint64)) for _ in range(2))
    ev = sv.evaluator
    prod = sealapi.Ciphertext()
    ev.multiply(a, b, prod)
    pt = sv.encode_ntt(rng.integers(0, p, cl.params.slot_count, dtype=np.uint64))
    a_ntt = sv.to_ntt(a)
    return {
        "ct_x_ct_ms": _time_ms(lambda: ev.multiply(a, b, sealapi.Ciphertext())),
        "relin_ms": _time_ms(lambda: ev.relinearize(prod, sv.relin_keys, sealapi.Ciphertext())),
        "rotate_ms": _time_ms(lambda: sv.rotate_rows(a, 1)),
        "ct_x_pt_ms": _time_ms(lambda: ev.multiply_plain(a_ntt, pt, sealapi.Ciphertext())),
    }


def measure(bits: int, chain: list[int] | None = None, T: int = 128, ring: int = 8192) -> dict:
    params = HEParams(poly_modulus_degree=ring, plain_modulus_bits=bits, coeff_modulus_bits=chain)
    cl = ClientHE(params)
    rng = np.random.default_rng(0)
    mv = MatvecPlan(3072, 768, params)
    op = OuterAttentionPlan(12, 64, T, params)
    inner = InnerKVCache(12, 64, params)
    sv = ServerHE.from_bundle(cl.public_bundle(mv.galois_steps() | op.galois_steps() | inner.galois_steps()))
    inner.model = sv.noise_model
    p = params.plain_modulus
    x = cl.encrypt(mv.pack_input(rng.integers(0, p, 3072, dtype=np.uint64)))
    out = {"N": ring, "p": p, "p_bits": params.plain_modulus_bits, "chain": "-".join(map(str, params.coeff_modulus_bits)), "fresh": cl.noise_budget(x)}
    W = rng.integers(-(p // 2), p // 2, (3072, 768))  # worst case: full-size weights
    y = mv.apply(sv, mv.encode_weights(sv, W), x)
    out["matvec_3072x768"] = min(cl.noise_budget(c) for c in y)
    K = rng.integers(0, p, (T, 12, 64), dtype=np.uint64).astype(np.int64)
    Dk, nk = op.pack_keys(K)
    Dv, nv = op.pack_values(K)
    enc = lambda D, nz: [[cl.encrypt(D[g, b]) if nz[g, b] else None for b in range(D.shape[1])] for g in range(D.shape[0])]
    cache = OuterKVCache(op, enc(Dk, nk), enc(Dv, nv), sv.noise_model.fresh)
    s = op.scores(sv, cache, cl.encrypt(op.pack_query(rng.integers(0, p, (12, 64), dtype=np.uint64).astype(np.int64))))
    o = op.attend(sv, cache, cl.encrypt(op.pack_probs(rng.integers(0, p, (12, T), dtype=np.uint64).astype(np.int64))))
    out[f"outer_scores_T{T}"] = cl.noise_budget(s)
    out[f"outer_pv_T{T}"] = cl.noise_budget(o)
    for t in range(20):
        v = inner.pack_token(rng.integers(0, p, 768, dtype=np.uint64).astype(np.int64), t)
        inner.append(sv, cl.encrypt(v), cl.encrypt(v))
    ss = inner.scores(sv, cl.encrypt(inner.pack_query(rng.integers(0, p, 768, dtype=np.uint64).astype(np.int64))))
    out["inner_scores"] = min(cl.noise_budget(c) for c in ss)
    oo = inner.attend(sv, [cl.encrypt(v) for v in inner.pack_probs(rng.integers(0, p, (12, 20), dtype=np.uint64).astype(np.int64))])
    out["inner_pv"] = cl.noise_budget(oo)
    out.update({k: round(v, 2) for k, v in _op_times(cl, sv, p, rng).items()})
    out["noise_model"] = sv.noise_model.to_dict()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[30, 40, 50])
    ap.add_argument(
        "--chains", nargs="+", default=["default"],
        help="coefficient-modulus chains to compare: 'default' (the shipped one) or comma-separated prime sizes",
    )
    ap.add_argument("--ring", type=int, default=8192, help="ring dimension N (8192 or 16384)")
    ap.add_argument("--out", default="results/noise_budget.json")
    args = ap.parse_args()
    chains = [None if c == "default" else [int(b) for b in c.split(",")] for c in args.chains]
    rows = [measure(b, chain, ring=args.ring) for chain in chains for b in args.bits]
    keys = [k for k in rows[0] if k not in ("p", "noise_model")]
    print(" | ".join(f"{k:>16}" for k in keys))
    for r in rows:
        print(" | ".join(f"{r[k]:>16}" for k in keys))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
