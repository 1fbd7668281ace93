"""``cryptogen``: command-line entry points.

    cryptogen serve --model PATH [--host H] [--port P] [--config NAME_OR_PATH]
    cryptogen generate --model PATH | --server HOST:PORT --prompt TEXT [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import logging
import sys


def _serve(args) -> int:
    from .config import load_config
    from .server.serve import serve

    config = load_config(args.config)

    def announce(port: int):
        # The one line a parent process (local mode) waits for; then stdout is quiet.
        print(f"CRYPTOGEN_LISTENING {args.host}:{port}", flush=True)

    serve(args.model, host=args.host, port=args.port, config=config, ready=announce, progress=not args.quiet)
    return 0


def _generate(args) -> int:
    import time

    from transformers import AutoTokenizer, TextStreamer

    from .hf.modeling import CryptoGenForCausalLM

    if not args.model and not args.server:
        raise SystemExit("cryptogen generate: give --model PATH (local server) or --server HOST:PORT")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = CryptoGenForCausalLM.from_pretrained(args.model, server=args.server, settings=args.config)
    try:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        start = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            streamer=TextStreamer(tokenizer, skip_prompt=False),
        )
        elapsed = time.perf_counter() - start
        new = out.shape[1] - inputs.input_ids.shape[1]
        print(f"\n[{new} tokens in {elapsed:.1f} s: {elapsed / max(new, 1):.2f} s/token, secure]", file=sys.stderr)
    finally:
        model.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cryptogen", description="Private text generation (CryptoGen) for HF models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="host a GPT-2 checkpoint for secure sessions")
    p.add_argument("--model", required=True, help="HF checkpoint folder (config.json + weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free port, printed)")
    p.add_argument("--config", default=None, help="cryptogen_hf config name or YAML path (default: configs/default.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="generate securely from a prompt")
    g.add_argument("--model", default=None, help="checkpoint folder: starts a local server on loopback")
    g.add_argument("--server", default=None, help="HOST:PORT of a running `cryptogen serve`")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--config", default=None, help="cryptogen_hf config name or YAML path")
    g.set_defaults(func=_generate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
