#!/usr/bin/env python
"""Token-level perplexity of a causal LM with HF's sliding-window (strided) recipe.

The arithmetic lives in cryptogen_hf.eval.perplexity.sliding_window_nll; this
script only loads things, calls it, and prints / writes the result.

Examples:
    python scripts/eval_ppl.py --data ../shared/data/wikitext-2/test.txt
    python scripts/eval_ppl.py --data ../shared/data/ptb/test.txt --max-tokens 20000 --json ptb.json
    python scripts/eval_ppl.py --dataset wikitext --dataset-config wikitext-2-raw-v1 --split test

Perplexity is per token of the model's own tokenizer, so it is only comparable
between models that share a tokenizer; the JSON also carries bits per byte and
a per-word perplexity (total NLL / whitespace words) for rough cross-tokenizer
comparison.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from cryptogen_hf import SHIPPED_MODEL_DIR  # noqa: E402
from cryptogen_hf.eval.perplexity import hf_model_fn, sliding_window_nll  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="plain-text file to evaluate")
    src.add_argument("--dataset", help="HF datasets name, e.g. wikitext (needs `datasets` and a reachable hub)")
    p.add_argument("--dataset-config", default=None, help="HF datasets config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="test", help="HF datasets split (default: test)")
    p.add_argument("--text-column", default="text", help="HF datasets column holding the text")
    p.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="model dir or hub id (default: the shipped tiny-gpt2)")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: model context, n_positions)")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts (default 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def load_text(args):
    """Return (text, description of the source)."""
    if args.data is not None:
        return args.data.read_text(encoding="utf-8"), str(args.data)
    try:
        import datasets  # optional dependency
    except ImportError:
        sys.exit("error: --dataset needs the `datasets` package (pip install datasets); "
                 "or pass a local file with --data")
    try:
        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
    except Exception as e:  # offline hub, unknown name, ... : say so plainly
        sys.exit(f"error: could not load dataset {args.dataset!r} config {args.dataset_config!r} "
                 f"split {args.split!r}: {type(e).__name__}: {e}\n"
                 "If the hub is unreachable, pass a local text file with --data.")
    # HF's perplexity guide joins wikitext rows with blank lines.
    text = "\n\n".join(ds[args.text_column])
    return text, f"{args.dataset}/{args.dataset_config}/{args.split}"


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    text, source = load_text(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    model.eval()
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings")
    window = args.window or context
    if window > context:
        sys.exit(f"error: --window {window} exceeds the model context {context}")
    if args.stride >= window:
        sys.exit(f"error: --stride {args.stride} must be smaller than the window {window}")

    # Tokenize the whole text once (no BOS/EOS added), then slice: a prefix of
    # tokens, not of characters, so --max-tokens means exactly that.
    # verbose=False: the "longer than model_max_length" warning is expected here.
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_total = len(ids)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    evaluated_text = tok.decode(ids)

    t0 = time.time()
    with tqdm(total=len(ids) - 1, desc="ppl", unit="tok", dynamic_ncols=True) as bar:
        res = sliding_window_nll(hf_model_fn(model), ids, window=window, stride=args.stride,
                                 progress=bar.update)
    seconds = time.time() - t0

    n_bytes = len(evaluated_text.encode("utf-8"))
    n_words = len(evaluated_text.split())
    result = {
        "model": str(args.model),
        "data": source,
        "tokenizer": f"{type(tok).__name__} (vocab {len(tok)}) from {args.model}",
        "n_tokens_total": n_total,
        "n_tokens_evaluated": len(ids),
        "n_tokens_scored": res.n_tokens,
        "window": window,
        "stride": args.stride,
        "n_windows": res.n_windows,
        "nll_per_token": res.mean_nll,
        "ppl": res.ppl,
        "bits_per_byte": res.nll_sum / math.log(2) / n_bytes,
        "word_ppl": math.exp(res.nll_sum / n_words),
        "n_words": n_words,
        "seconds": round(seconds, 1),
    }
    slice_note = "" if args.max_tokens is None or args.max_tokens >= n_total else \
        f" (first {len(ids):,} of {n_total:,} tokens)"
    print(f"model     {result['model']}")
    print(f"data      {result['data']}{slice_note}")
    print(f"tokenizer {result['tokenizer']}")
    print(f"tokens    {res.n_tokens:,} scored, window {window}, stride {args.stride}, {res.n_windows} windows, {seconds:.1f}s")
    print(f"ppl       {res.ppl:.3f}  (nll/token {res.mean_nll:.4f}; bits/byte {result['bits_per_byte']:.4f}; "
          f"word-level ppl {result['word_ppl']:.2f})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
