"""Time each HE kernel at GPT-2-base and small-model shapes (one thread).

Usage: OMP_NUM_THREADS=1 python scripts/bench_he_kernels.py [--quick] [--out results/bench_he_kernels.json]
"""

import argparse
import json
import os
import time

import numpy as np

from cryptogen_hf.he import ClientHE, DecodeMatvecPlan, HEParams, InnerKVCache, OuterAttentionPlan, OuterKVCache, PrefillMatvecPlan, ServerHE


def timeit(fn, reps=1):
    best = None
    for _ in range(reps):
        t = time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench_he_kernels.json")
    ap.add_argument("--quick", action="store_true", help="small shapes and contexts only")
    args = ap.parse_args()
    params = HEParams()
    cl = ClientHE(params)
    rng = np.random.default_rng(0)
    mv_shapes = [(192, 576), (192, 192), (192, 768), (768, 192), (192, 4096)]
    if not args.quick:
        mv_shapes += [(768, 768), (768, 2304), (768, 3072), (3072, 768)]
    attn = [(4, 48, [64, 128])] if args.quick else [(4, 48, [64, 128, 256, 512]), (12, 64, [64, 128, 256, 512])]
    prefill = [(192, 576, 64)] if args.quick else [(192, 576, 64), (768, 768, 64), (768, 768, 512)]
    mv_plans = {s: DecodeMatvecPlan(*s, params) for s in mv_shapes}
    at_plans = {(H, dh, T): OuterAttentionPlan(H, dh, T, params) for H, dh, Ts in attn for T in Ts}
    inners = {(H, dh): InnerKVCache(H, dh, params) for H, dh, _ in attn}
    steps = set()
    for p in list(mv_plans.values()) + list(at_plans.values()) + list(inners.values()):
        steps |= p.galois_steps()
    t_b, bundle = timeit(lambda: cl.public_bundle(steps))
    sv = ServerHE.from_bundle(bundle)
    rows = [{"kernel": "public_bundle", "shape": f"{len(steps)} galois steps", "seconds": t_b, "bytes": len(bundle)}]
    for s, pl in mv_plans.items():
        W = rng.integers(-8192, 8192, s)
        t_enc, enc = timeit(lambda: pl.encode_weights(sv, W))
        ct = cl.encrypt(pl.pack_input(rng.integers(-8192, 8192, s[0])))
        t, _ = timeit(lambda: pl.apply(sv, enc, ct), reps=2)
        rows.append({"kernel": "decode_matvec", "shape": f"{s[0]}x{s[1]}", "seconds": t, "encode_s": t_enc,
                     "c": pl.c, "K": pl.K, "n1": pl.n1, "tiles": pl.n_tiles, "rotation_steps": len(pl.galois_steps())})
    for d_in, d_out, T in prefill:
        pl = PrefillMatvecPlan(d_in, d_out, T, params)
        W = rng.integers(-8192, 8192, (d_in, d_out))
        enc = pl.encode_weights(sv, W)
        cts = [cl.encrypt(x) for x in pl.pack_input(rng.integers(-8192, 8192, (T, d_in)))]
        t, _ = timeit(lambda: pl.apply(sv, enc, cts))
        rows.append({"kernel": "prefill_matvec", "shape": f"T={T} {d_in}x{d_out}", "seconds": t, "in_cts": d_in, "out_cts": pl.n_groups})
    for (H, dh, T), pl in at_plans.items():
        K = rng.integers(-4096, 4096, (T, H, dh))
        Dk, nk = pl.pack_keys(K)
        enc = lambda D, nz: [[cl.encrypt(D[g, b]) if nz[g, b] else None for b in range(D.shape[1])] for g in range(D.shape[0])]
        kd = enc(Dk, nk)
        cache = OuterKVCache(pl, kd, kd, sv.noise_model.fresh)
        q = cl.encrypt(pl.pack_query(rng.integers(-4096, 4096, (H, dh))))
        pr = cl.encrypt(pl.pack_probs(rng.integers(0, 4096, (H, T))))
        t1, _ = timeit(lambda: pl.scores(sv, cache, q))
        t2, _ = timeit(lambda: pl.attend(sv, cache, pr))
        rows.append({"kernel": "attention_outer", "shape": f"H={H} dh={dh} T={T}", "scores_s": t1, "pv_s": t2,
                     "seconds": t1 + t2, "cache_bytes": cache.nbytes})
    for (H, dh), tmpl in inners.items():
        Ts = [T for h, d, Tl in attn if (h, d) == (H, dh) for T in Tl]
        cache = InnerKVCache(H, dh, params, sv.noise_model)
        for T in Ts:
            while cache.n_tokens < T:
                t_ = cache.n_tokens
                v = cl.encrypt(cache.pack_token(rng.integers(-4096, 4096, H * dh), t_))
                cache.append(sv, v, v)
            q = cl.encrypt(cache.pack_query(rng.integers(-4096, 4096, H * dh)))
            ps = [cl.encrypt(x) for x in cache.pack_probs(rng.integers(0, 4096, (H, T)))]
            t1, _ = timeit(lambda: cache.scores(sv, q))
            t2, _ = timeit(lambda: cache.attend(sv, ps))
            rows.append({"kernel": "attention_inner", "shape": f"H={H} dh={dh} T={T}", "scores_s": t1, "pv_s": t2,
                         "seconds": t1 + t2, "cache_bytes": cache.nbytes, "blocks": len(cache.k_cts)})
    print(f"{'kernel':<18} {'shape':<22} {'seconds':>9}")
    for r in rows:
        print(f"{r['kernel']:<18} {r['shape']:<22} {r['seconds']:>9.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"params": params.to_dict(), "fingerprint": params.fingerprint(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
