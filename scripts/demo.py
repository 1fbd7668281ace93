"""The main job: secure generation with the small GPT-2 shipped in the repo.

Starts a `cryptogen serve` process for the shipped checkpoint (it alone loads
the weights; this process is the client, and there is no third party),
generates from the prompt through the CryptoGen protocol with
`model.generate()`, and prints the secure output next to the plaintext
model's, with per-token latency and the share of it spent making the
correlated randomness.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cryptogen_hf import SHIPPED_MODEL_DIR
from cryptogen_hf.bench import TokenTimer
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR),
                        help="GPT-2 or LLaMA-family checkpoint folder (default: the shipped GPT-2; the shipped LLaMA: "
                             "cryptogen_hf/models/tiny-llama)")
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--config", default=None, help="cryptogen_hf config name or YAML path (default: configs/default.yaml)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids

    print(f"starting the server for {args.model} ...", flush=True)
    start = time.perf_counter()
    secure = CryptoGenForCausalLM.from_pretrained(args.model, settings=args.config)
    print(f"secure session ready in {time.perf_counter() - start:.1f} s (keys made, server loaded and encoded the weights)")
    try:
        bar = TokenTimer(args.max_new_tokens)
        out = secure.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=bar)
        stats = secure.session.stats()
        correlations = secure.session.correlation_stats()
    finally:
        secure.close()

    plain_model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    with torch.no_grad():
        plain = plain_model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False, attention_mask=torch.ones_like(input_ids))

    n_prompt = input_ids.shape[1]
    first = bar.first_token_s
    decode = bar.latencies[1:]
    print()
    print(f"prompt:           {args.prompt!r} ({n_prompt} tokens)")
    print(f"secure output:    {tokenizer.decode(out[0, n_prompt:])!r}")
    print(f"plaintext output: {tokenizer.decode(plain[0, n_prompt:])!r}")
    print(f"identical tokens: {out.tolist() == plain.tolist()}")
    print(f"prefill ({n_prompt} tokens, one pass) + first token: {first:.2f} s")
    if decode:
        print(f"per-token latency (decode, context {n_prompt + 1}..{out.shape[1] - 1}): {sum(decode) / len(decode):.2f} s")
    print(f"encrypted KV cache at the server: {stats['cache_bytes'] / 2**20:.1f} MiB for {stats['tokens']} tokens")
    if correlations:
        print(f"correlated randomness (two parties, no dealer): {correlations['seconds']:.1f} s of the client's time, "
              f"{correlations['arithmetic']} arithmetic and {correlations['and_bits']} AND-gate correlations made")


if __name__ == "__main__":
    main()
