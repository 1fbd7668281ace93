"""Perplexity from the command line: ``cryptogen eval`` and ``scripts/eval_ppl.py``.

Token-level perplexity with HF's sliding-window (strided) recipe; the
arithmetic is ``cryptogen_hf.eval.perplexity.sliding_window_nll``. The same
code scores the plaintext model (default) and, with ``--secure``, the secure
model: ``CryptoGenForCausalLM``'s forward pass is a function from token ids
to logits like any HF model's, so ``hf_model_fn`` wraps both. Each secure
window is a fresh conversation (one prefill pass through the protocol), so
the secure result is comparable window for window with the plaintext one.

A secure pass costs seconds per token, so ``--secure`` scores a stated slice
by default: the first 64 tokens, window 32, stride 16 (all three can be set).

Perplexity is per token of the model's own tokenizer, so it is only comparable
between models that share a tokenizer; the JSON also carries bits per byte and
a per-word perplexity (total NLL / whitespace words) for rough cross-tokenizer
comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ..cli_common import (CLIError, add_settings_arguments, load_pretrained, local_model_dir, model_source,
                          positive_int, settings_from_args)
from .perplexity import hf_model_fn, sliding_window_nll

SECURE_DEFAULT_TOKENS = 64
SECURE_DEFAULT_WINDOW = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .. import SHIPPED_MODEL_DIR

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="plain-text file to evaluate")
    src.add_argument("--dataset", help="HF datasets name, e.g. wikitext (needs `datasets` and a reachable hub)")
    parser.add_argument("--dataset-config", default=None, help="HF datasets config, e.g. wikitext-2-raw-v1")
    parser.add_argument("--split", default="test", help="HF datasets split (default: test)")
    parser.add_argument("--text-column", default="text", help="HF datasets column holding the text")
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="model folder or hub id (default: the shipped tiny-gpt2)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--secure", action="store_true",
                        help=f"score the secure model (a local server process) on a slice: default first "
                             f"{SECURE_DEFAULT_TOKENS} tokens, window {SECURE_DEFAULT_WINDOW}")
    add_settings_arguments(parser)
    parser.add_argument("--window", type=positive_int, default=None,
                        help=f"tokens per window (default: the model context; {SECURE_DEFAULT_WINDOW} with --secure)")
    parser.add_argument("--stride", type=positive_int, default=None, help="tokens between window starts (default: window // 2)")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help=f"evaluate only the first N tokens (default: all; {SECURE_DEFAULT_TOKENS} with --secure)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")


def load_text(args) -> tuple[str, str]:
    """Return (text, description of the source)."""
    if args.data is not None:
        if not args.data.is_file():
            raise CLIError(f"no text file at {str(args.data)!r}")
        return args.data.read_text(encoding="utf-8"), str(args.data)
    try:
        import datasets  # optional dependency
    except ImportError:
        raise CLIError("--dataset needs the `datasets` package (pip install datasets); or pass a local file with --data")
    try:
        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
    except Exception as e:  # offline hub, unknown name, ... : say so plainly
        raise CLIError(f"could not load dataset {args.dataset!r} config {args.dataset_config!r} split {args.split!r}: "
                       f"{type(e).__name__}: {e}\nIf the hub is unreachable, pass a local text file with --data.")
    # HF's perplexity guide joins wikitext rows with blank lines.
    return "\n\n".join(ds[args.text_column]), f"{args.dataset}/{args.dataset_config}/{args.split}"


def _load_model(args):
    """(model, description); the secure model starts a local server for the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    if args.secure:
        from ..hf.modeling import CryptoGenForCausalLM

        settings = settings_from_args(args)
        model = CryptoGenForCausalLM.from_pretrained(local_model_dir(args.model), settings=settings)
        return model, f"secure (dealer={settings.mpc.dealer}, reveal={settings.mpc.reveal})"
    model = load_pretrained(AutoModelForCausalLM, model_source(args.model), dtype=torch.float32)
    return model.eval(), "plaintext"


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    text, source = load_text(args)
    if args.secure:
        local_model_dir(args.model)  # before any slow work
    tok = load_pretrained(AutoTokenizer, model_source(args.tokenizer or args.model))
    # Tokenize the whole text once (no BOS/EOS added), then slice: a prefix of
    # tokens, not of characters, so --max-tokens means exactly that.
    # verbose=False: the "longer than model_max_length" warning is expected here.
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_total = len(ids)
    max_tokens = args.max_tokens or (SECURE_DEFAULT_TOKENS if args.secure else None)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise CLIError(f"the text has {len(ids)} token(s); at least 2 are needed to score anything")

    model, mode = _load_model(args)
    try:
        context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings")
        window = args.window or (min(SECURE_DEFAULT_WINDOW, context) if args.secure else context)
        stride = args.stride or max(1, window // 2)
        if window > context:
            raise CLIError(f"--window {window} exceeds the model context {context}")
        if window < 2:
            raise CLIError("--window must be at least 2")
        if stride >= window:
            raise CLIError(f"--stride {stride} must be smaller than the window {window}")
        if int(max(ids)) >= model.config.vocab_size:
            raise CLIError(f"the tokenizer makes ids up to {max(ids)} but the model's vocabulary has "
                           f"{model.config.vocab_size}: not this model's tokenizer")
        t0 = time.time()
        with tqdm(total=len(ids) - 1, desc=f"ppl ({mode.split()[0]})", unit="tok", dynamic_ncols=True) as bar:
            res = sliding_window_nll(hf_model_fn(model), ids, window=window, stride=stride, progress=bar.update)
        seconds = time.time() - t0
    finally:
        if args.secure:
            model.close()

    evaluated_text = tok.decode(ids)
    n_bytes = max(1, len(evaluated_text.encode("utf-8")))
    n_words = max(1, len(evaluated_text.split()))
    result = {
        "model": str(args.model),
        "mode": mode,
        "secure": bool(args.secure),
        "data": source,
        "tokenizer": f"{type(tok).__name__} (vocab {len(tok)}) from {args.tokenizer or args.model}",
        "n_tokens_total": n_total,
        "n_tokens_evaluated": len(ids),
        "n_tokens_scored": res.n_tokens,
        "window": window,
        "stride": stride,
        "n_windows": res.n_windows,
        "nll_per_token": res.mean_nll,
        "ppl": res.ppl,
        "bits_per_byte": res.nll_sum / math.log(2) / n_bytes,
        "word_ppl": math.exp(res.nll_sum / n_words),
        "n_words": n_words,
        "seconds": round(seconds, 1),
    }
    slice_note = "" if len(ids) >= n_total else f" (first {len(ids):,} of {n_total:,} tokens)"
    print(f"model     {result['model']} [{mode}]")
    print(f"data      {result['data']}{slice_note}")
    print(f"tokenizer {result['tokenizer']}")
    print(f"tokens    {res.n_tokens:,} scored, window {window}, stride {stride}, {res.n_windows} windows, {seconds:.1f}s")
    print(f"ppl       {res.ppl:.3f}  (nll/token {res.mean_nll:.4f}; bits/byte {result['bits_per_byte']:.4f}; "
          f"word-level ppl {result['word_ppl']:.2f})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
