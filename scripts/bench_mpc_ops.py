#!/usr/bin/env python3
"""Time the MPC non-linear ops through two real processes (plus the TTP
dealer): softmax at decode shapes, GELU, LayerNorm, with CrypTen's rounds and
bytes and the max abs error against torch.

Thin wrapper: the "mpc" section of scripts/bench_kernels.py, which holds the
code and documents the figures.

    python scripts/bench_mpc_ops.py [--dealers none,ttp] [--reps 3] [--out results/bench_mpc_ops.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dealers", default="none,ttp", help="comma-separated dealer modes (none, ttp, client)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="results/bench_mpc_ops.json")
    args = ap.parse_args(argv)
    return bench_kernels.main(["--sections", "mpc", "--dealers", args.dealers, "--repeats", str(args.reps), "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
