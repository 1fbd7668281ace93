#!/usr/bin/env python3
"""Time the MPC non-linear ops through two real processes (plus the TTP
dealer): softmax at decode shapes, GELU, LayerNorm. Records wall time per
call (median of --reps, measured at the server), communication rounds and
bytes sent by the server (CrypTen's communicator stats), and the max abs
error against torch. Writes JSON (--out) and prints a table.

    python scripts/bench_mpc_ops.py [--dealer ttp|client] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from cryptogen_hf.mpc.runtime import MPCConfig, launch_local, rank_of


def _cases():
    """(name, op, shape) for every benchmarked call."""
    cases = []
    for heads, label in ((12, "base"), (4, "small")):
        for n in (64, 128, 256, 512):
            cases.append((f"softmax_{label}_h{heads}_ctx{n}", "softmax", (heads, 1, n)))
    cases.append(("gelu_3072", "gelu", (1, 3072)))
    cases.append(("gelu_768", "gelu", (1, 768)))
    cases.append(("layer_norm_768", "layer_norm", (1, 768)))
    cases.append(("layer_norm_192", "layer_norm", (1, 192)))
    return cases


def _input(op, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if op == "softmax":
        s = torch.randn(*shape, generator=g) * 3.0
        s[..., 0] += 12.0  # attention sink, as in GPT-2
        return s
    if op == "gelu":
        return torch.randn(*shape, generator=g) * 3.0
    # layer_norm: GPT-2-like residual row with an outlier dimension
    x = torch.randn(*shape, generator=g) * 20.0
    x[..., 5] = 1000.0
    return x


def bench_program(role, reps):
    from cryptogen_hf.crypten_compat import import_crypten

    crypten = import_crypten()
    from crypten.config import cfg

    from cryptogen_hf.mpc import ops

    cfg.communicator.verbose = True  # CrypTen counts rounds/bytes only when verbose
    comm = crypten.communicator.get()
    rows = []
    for i, (name, op, shape) in enumerate(_cases()):
        x = _input(op, shape, seed=i)
        if op == "softmax":
            fn, ref = ops.softmax, torch.softmax(x, -1)
        elif op == "gelu":
            fn, ref = ops.gelu, ops.gelu_reference(x)
        else:
            scale = ops.calibrate_pre_scale(x)
            fn = lambda z, s=scale: ops.layer_norm(z, pre_scale=s)  # noqa: E731
            ref = ops.layer_norm_reference(x)
        times, stats, err = [], None, None
        for _ in range(reps):
            ex = crypten.cryptensor(x if role == "client" else torch.zeros_like(x), src=rank_of("client"))
            comm.barrier()
            comm.reset_communication_stats()
            t0 = time.perf_counter()
            y = fn(ex)
            times.append(time.perf_counter() - t0)
            stats = comm.get_communication_stats()
            err = (y.get_plain_text() - ref).abs().max().item()
        rows.append(
            {
                "name": name,
                "op": op,
                "shape": list(shape),
                "time_s_median": statistics.median(times),
                "time_s_all": times,
                "rounds": int(stats["rounds"]),
                "bytes_sent_by_this_party": int(stats["bytes"]),
                "max_abs_err": err,
            }
        )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dealer", default="ttp", choices=["ttp", "client"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="results/bench_mpc_ops.json")
    args = ap.parse_args(argv)

    t0 = time.time()
    res = launch_local(bench_program, MPCConfig(dealer=args.dealer, timeout_s=120), (args.reps,), wall_timeout_s=900)
    rows = res["server"]
    report = {
        "dealer": args.dealer,
        "reps": args.reps,
        "measured_at": "server process; loopback TCP (gloo); 1 torch thread per process",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "torch": torch.__version__,
        "total_wall_s": time.time() - t0,
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    print(f"{'op':34s} {'shape':>14s} {'time ms':>9s} {'rounds':>7s} {'KB sent':>9s} {'max err':>9s}")
    for r in rows:
        print(
            f"{r['name']:34s} {str(tuple(r['shape'])):>14s} {1e3 * r['time_s_median']:9.1f} "
            f"{r['rounds']:7d} {r['bytes_sent_by_this_party'] / 1024:9.1f} {r['max_abs_err']:9.2e}"
        )
    print(f"wrote {args.out} ({report['total_wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
