"""``cryptogen``: command-line entry points.

    cryptogen credentials --host H [--host H2 ...] --out DIR
    cryptogen serve --model PATH --cert PEM --key PEM --tokens FILE [--host H] [--port P] [--config NAME_OR_PATH]
    cryptogen generate --model PATH | --server HOST:PORT --server-cert PEM --token-file FILE --prompt TEXT
    cryptogen eval --data FILE [--model PATH] [--secure [--max-tokens N --window W --stride S]]
    cryptogen bench [--model PATH] [--contexts 32 64 ...] [--client-dealer-weights-public] [--out FILE.json]
    cryptogen finetune --model PATH --train-file FILE --output-dir DIR [--max-steps N ...]

``cryptogen COMMAND --help`` describes each. User errors (a missing model
folder, a bad value) end with one line, ``cryptogen COMMAND: error: ...``, and
exit status 2; the scripts in ``scripts/`` that wrap these commands share the
same code.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _serve(args) -> int:
    from .cli_common import local_model_dir
    from .config import load_config
    from .server.serve import serve

    local_model_dir(args.model)
    config = load_config(args.config)
    if args.model_name is not None:
        config.server.model_name = args.model_name
    config.server.diagnostics = config.server.diagnostics or args.diagnostics
    if args.max_sessions is not None:
        config.server.max_concurrent_sessions = args.max_sessions
    if args.max_sessions_per_client is not None:
        config.server.max_sessions_per_client = args.max_sessions_per_client
    if args.he_workers is not None:
        config.server.he_workers = args.he_workers
    for key in ("cert", "key", "tokens"):
        if getattr(args, key):
            setattr(config.server, f"{key}_file", getattr(args, key))
    config.validate()

    def announce(port: int):
        # The one line a parent process (local mode) waits for; then stdout is quiet.
        print(f"CRYPTOGEN_LISTENING {args.host}:{port}", flush=True)

    serve(args.model, host=args.host, port=args.port, config=config, ready=announce, progress=not args.quiet)
    return 0


def _generate(args) -> int:
    import time

    from transformers import AutoTokenizer, TextStreamer

    from .cli_common import CLIError, local_model_dir
    from .config import load_config
    from .hf.modeling import CryptoGenForCausalLM

    if not args.model and not args.server:
        raise CLIError("give --model PATH (local server) or --server HOST:PORT")
    if args.model:
        local_model_dir(args.model)
    if not (args.tokenizer or args.model):
        raise CLIError("with --server, give --tokenizer PATH (the client needs only the tokenizer)")
    settings = load_config(args.config)
    if args.speculative_reveals_acceptance:
        settings.generation.speculative_reveals_acceptance = True
    speculative = {}
    if args.draft or args.prompt_lookup:
        if args.draft and args.prompt_lookup:
            raise CLIError("--draft and --prompt-lookup are two ways to draft tokens: give one")
        if not settings.generation.speculative_reveals_acceptance:
            raise CLIError("--draft and --prompt-lookup let the server learn how many drafted tokens each check "
                           "accepted (a few bits per check about your text): add --speculative-reveals-acceptance to accept that")
        if args.draft:
            from transformers import AutoModelForCausalLM

            speculative["assistant_model"] = AutoModelForCausalLM.from_pretrained(local_model_dir(args.draft)).eval()
        else:
            speculative["prompt_lookup_num_tokens"] = args.prompt_lookup
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    remote = {}
    if args.server:
        from .protocol.credentials import read_token

        remote = {"server_cert": args.server_cert, "server_token": read_token(None, args.token_file)}
    model = CryptoGenForCausalLM.from_pretrained(args.model, server=args.server, settings=settings, **remote)
    try:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        start = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            streamer=TextStreamer(tokenizer, skip_prompt=False),
            **speculative,
        )
        elapsed = time.perf_counter() - start
        new = out.shape[1] - inputs.input_ids.shape[1]
        passes = model.session.stats()["passes"]
        print(f"\n[{new} tokens in {elapsed:.1f} s: {elapsed / max(new, 1):.2f} s/token, {passes} secure passes]", file=sys.stderr)
    finally:
        model.close()
    return 0


def _credentials(args) -> int:
    from .protocol.credentials import write_credentials

    files = write_credentials(args.out, args.host)
    print(f"server certificate (give it to clients): {files['cert']}")
    print(f"server private key (keep it on the server): {files['key']}")
    print(f"tokens file for `cryptogen serve --tokens`: {files['tokens']}")
    print(f"the client's token (give it to that client only): {files['token']}")
    return 0


def build_parser(prog: str = "cryptogen") -> argparse.ArgumentParser:
    from . import bench, finetune
    from .cli_common import positive_int
    from .eval import run as eval_run

    parser = argparse.ArgumentParser(prog=prog, description="Private text generation (CryptoGen) for HF models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="host a GPT-2 checkpoint for secure sessions")
    p.add_argument("--model", required=True, help="HF checkpoint folder (config.json + weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free port, printed)")
    p.add_argument("--config", default=None, help="cryptogen_hf config name or YAML path (default: configs/default.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--model-name", default=None, help="a name to announce to clients (default: none; the handshake carries the model's shapes only)")
    p.add_argument("--max-sessions", type=int, default=None, help="sessions served at once (default: the config's, 4)")
    p.add_argument("--max-sessions-per-client", type=int, default=None,
                   help="sessions one client (a name in the tokens file) may hold at once (default: the config's, 4)")
    p.add_argument("--he-workers", type=int, default=None,
                   help="processes sharing each session's HE work, one core each (default: the config's, 1)")
    p.add_argument("--cert", default=None, help="TLS certificate (PEM) the server proves itself with (required)")
    p.add_argument("--key", default=None, help="the certificate's private key (PEM; required)")
    p.add_argument("--tokens", default=None, help="tokens file, one 'NAME TOKEN' per client (required)")
    p.add_argument("--diagnostics", action="store_true",
                   help="allow benchmark and diagnostic operations (random cache fill, per-phase timings, memory); off by default")
    p.set_defaults(func=_serve)

    c = sub.add_parser("credentials", help="make a self-signed TLS certificate, its key and a client token")
    c.add_argument("--host", action="append", required=True, help="a DNS name or IP address clients dial (repeat for more)")
    c.add_argument("--out", required=True, help="folder to write server.pem, server.key, tokens.txt, client.token")
    c.set_defaults(func=_credentials)

    g = sub.add_parser("generate", help="generate securely from a prompt")
    g.add_argument("--model", default=None, help="checkpoint folder: starts a local server on loopback")
    g.add_argument("--server", default=None, help="HOST:PORT of a running `cryptogen serve`")
    g.add_argument("--server-cert", default=None, help="with --server: the server's certificate or CA (PEM); default: the system's CAs")
    g.add_argument("--token-file", default=None, help="with --server: file holding this client's token")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--config", default=None, help="cryptogen_hf config name or YAML path")
    g.add_argument("--draft", default=None,
                   help="speculative decoding: a plaintext draft model folder at this client (same tokenizer), e.g. "
                        "cryptogen_hf/models/tiny-gpt2-draft")
    g.add_argument("--prompt-lookup", type=positive_int, default=None, metavar="K",
                   help="prompt-lookup decoding: draft K tokens from n-grams of the prompt")
    g.add_argument("--speculative-reveals-acceptance", action="store_true",
                   help="accept that with --draft or --prompt-lookup the server learns how many drafted tokens each "
                        "check accepted (the same as generation.speculative_reveals_acceptance: true in --config)")
    g.set_defaults(func=_generate)

    raw = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser("eval", help="perplexity of a checkpoint on a text, plaintext or --secure",
                       description=eval_run.__doc__, formatter_class=raw)
    eval_run.add_arguments(e)
    e.set_defaults(func=eval_run.run)

    b = sub.add_parser("bench", help="secure generation latency against context (cache vs recompute)",
                       description=bench.__doc__, formatter_class=raw)
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)

    f = sub.add_parser("finetune", help="fine-tune a causal LM on a text file (transformers Trainer)",
                       description=finetune.__doc__, formatter_class=raw)
    finetune.add_arguments(f)
    f.set_defaults(func=finetune.run)
    return parser


def main(argv=None, prog: str = "cryptogen") -> int:
    from .cli_common import CLIError
    from .config import ConfigError
    from .protocol.credentials import CredentialsError
    from .families import UnsupportedArchitectureError

    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (CLIError, ConfigError, CredentialsError, UnsupportedArchitectureError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
