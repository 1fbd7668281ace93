"""The main job: generate text with the small GPT-2 shipped in the repo.

Today this runs the plaintext model (the secure path lands with the
CryptoGenForCausalLM issue); it prints the prompt, the output and the
per-token latency.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from cryptogen_hf import SHIPPED_MODEL_DIR


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="HF checkpoint folder (default: the shipped model)")
    parser.add_argument("--prompt", default="The history of the city")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids

    # Greedy decoding one token at a time so the progress bar and the
    # per-token latency are visible; same tokens as model.generate(do_sample=False).
    past = None
    ids = input_ids
    step_input = input_ids
    latencies = []
    with torch.no_grad():
        for _ in tqdm(range(args.max_new_tokens), desc="generating (plaintext)", unit="tok"):
            start = time.perf_counter()
            out = model(step_input, cache=past, use_cache=True)
            past = out.cache
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            latencies.append(time.perf_counter() - start)
            ids = torch.cat([ids, next_id], dim=1)
            step_input = next_id
            if next_id.item() == tokenizer.eos_token_id:
                break

    print(f"model:  {args.model}")
    print(f"prompt: {args.prompt!r}")
    print(f"output: {tokenizer.decode(ids[0, input_ids.shape[1]:])!r}")
    print(f"plaintext per-token latency: {1000 * sum(latencies) / len(latencies):.2f} ms over {len(latencies)} tokens")


if __name__ == "__main__":
    main()
