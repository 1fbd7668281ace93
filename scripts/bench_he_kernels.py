"""Time each HE kernel at GPT-2-base and small-model shapes (one thread).

Thin wrapper: the "he" section of scripts/bench_kernels.py (decode and prefill
matvec, attention against the encrypted cache in both layouts), which holds
the code and documents the figures.

Usage: python scripts/bench_he_kernels.py [--quick] [--repeats 3] [--out results/bench_he_kernels.json]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/bench_he_kernels.json")
    ap.add_argument("--quick", action="store_true", help="small shapes and contexts only")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    forwarded = ["--sections", "he", "--out", args.out, "--repeats", str(args.repeats)]
    return bench_kernels.main(forwarded + (["--quick"] if args.quick else []))


if __name__ == "__main__":
    sys.exit(main())
