#!/usr/bin/env python
"""Perplexity of a causal LM on a text: the same as ``cryptogen eval`` (cryptogen_hf/eval/run.py).

Examples:
    python scripts/eval_ppl.py --data ../shared/data/wikitext-2/test.txt
    python scripts/eval_ppl.py --data ../shared/data/ptb/test.txt --max-tokens 20000 --json ptb.json
    python scripts/eval_ppl.py --data ../shared/data/wikitext-2/test.txt --secure --dealer client
    python scripts/eval_ppl.py --dataset wikitext --dataset-config wikitext-2-raw-v1 --split test

``--secure`` scores the secure model (CryptoGenForCausalLM, a local server
process) on a slice: by default the first 64 tokens, window 32, stride 16.
``--help`` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cryptogen_hf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
