#!/usr/bin/env python
"""Secure generation latency against context, encrypted cache vs recompute: the same as ``cryptogen bench``.

The code is cryptogen_hf/bench.py; ``--help`` lists every option.

    python scripts/bench_generation.py --contexts 32 64 128 256 --dealer client --out results/bench_generation.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cryptogen_hf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
