"""Secure generation latency against context length: encrypted cache vs recompute.

For each context length C the session is filled with C - 1 tokens in one
prefill pass, then the next tokens are decoded one at a time with the
encrypted KV cache (what generate() does). The recompute baseline (what a
secure-inference system without a cache does) re-runs the whole prefix of C
tokens for one new token. Both are measured in the same run, against the same
server, so their ratio is meaningful on a noisy machine.

Writes JSON (figures, per-component breakdown from both parties, bytes and
rounds, memory) and a PNG plot of latency against context.

    python scripts/bench_generation.py --contexts 32 64 128 256 --out results/bench_generation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cryptogen_hf import SHIPPED_MODEL_DIR
from cryptogen_hf.config import load_config
from cryptogen_hf.crypten_compat import import_crypten
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM


def _delta(after: dict, before: dict) -> dict:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 4) for k in after}


def measure_context(session, crypten, context: int, decode_tokens: int, recompute: bool) -> dict:
    generator = torch.Generator().manual_seed(context)
    tokens = torch.randint(1, session.shape.vocab_size, (context + decode_tokens,), generator=generator).tolist()
    session.reset()
    start = time.perf_counter()
    session.forward(tokens[: context - 1], [False] * (context - 2) + [True])
    prefill_s = time.perf_counter() - start

    comm = crypten.communicator.get()
    comm.reset_communication_stats()
    channel = session.channel.stats
    sent0, recv0 = channel.bytes_sent, channel.bytes_received
    server0 = session.stats()
    client0 = dict(session.runner.timings)
    start = time.perf_counter()
    for i in range(decode_tokens):
        session.forward([tokens[context - 1 + i]], [True])
    decode_s = (time.perf_counter() - start) / decode_tokens
    server1 = session.stats()
    mpc = comm.get_communication_stats()
    row = {
        "context": context,
        "prefill_tokens": context - 1,
        "prefill_s": round(prefill_s, 3),
        "decode_s_per_token": round(decode_s, 3),
        "server_breakdown_s_per_token": {k: round(v / decode_tokens, 4) for k, v in _delta(server1["timings"], server0["timings"]).items()},
        "client_breakdown_s_per_token": {k: round(v / decode_tokens, 4) for k, v in _delta(dict(session.runner.timings), client0).items()},
        "mpc_rounds_per_token": mpc["rounds"] / decode_tokens,
        "mpc_bytes_per_token": mpc["bytes"] / decode_tokens,
        "he_channel_bytes_per_token": (channel.bytes_sent - sent0 + channel.bytes_received - recv0) / decode_tokens,
        "cache_bytes": server1["cache_bytes"],
        "cache_tokens": server1["tokens"],
        "server_peak_rss_mb": server1.get("peak_rss_mb"),
    }
    if recompute:
        # No cache: the whole prefix (context tokens) is processed for one new token.
        session.reset()
        start = time.perf_counter()
        session.forward(tokens[:context], [False] * (context - 1) + [True])
        row["recompute_s_per_token"] = round(time.perf_counter() - start, 3)
        row["speedup_cache_vs_recompute"] = round(row["recompute_s_per_token"] / decode_s, 2)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(contexts, [r["decode_s_per_token"] for r in rows], "o-", label="encrypted KV cache (CryptoGen)")
    if all("recompute_s_per_token" in r for r in rows):
        ax1.plot(contexts, [r["recompute_s_per_token"] for r in rows], "s--", label="recompute prefix (no cache)")
    ax1.set_xlabel("context (tokens)")
    ax1.set_ylabel("seconds per generated token")
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(contexts, [r["cache_bytes"] / 2**20 for r in rows], "o-", label="encrypted cache at the server")
    if all(r.get("server_peak_rss_mb") for r in rows):
        ax2.plot(contexts, [r["server_peak_rss_mb"] for r in rows], "^-", label="server worker peak RSS")
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel("MiB")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--decode-tokens", type=int, default=2, help="decode steps timed per context")
    parser.add_argument("--no-recompute", action="store_true", help="skip the recompute baseline")
    parser.add_argument("--config", default=None, help="cryptogen_hf config name or path (dealer etc.)")
    parser.add_argument("--dealer", choices=["ttp", "client"], default=None, help="override the config's dealer")
    parser.add_argument("--out", default="results/bench_generation.json")
    args = parser.parse_args()

    settings = load_config(args.config)
    if args.dealer:
        settings.mpc.dealer = args.dealer
    crypten = import_crypten()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = CryptoGenForCausalLM.from_pretrained(args.model, settings=settings)
    setup_s = time.perf_counter() - start
    crypten.config.cfg.communicator.verbose = True  # count rounds and bytes (this party's view)
    rows = []
    try:
        for context in tqdm(args.contexts, desc="contexts", unit="ctx"):
            rows.append(measure_context(model.session, crypten, context, args.decode_tokens, not args.no_recompute))
            tqdm.write(json.dumps({k: rows[-1][k] for k in ("context", "decode_s_per_token", "recompute_s_per_token") if k in rows[-1]}))
    finally:
        model.close()
    result = {
        "model": args.model,
        "shape": model.config.to_dict() if hasattr(model.config, "to_dict") else {},
        "dealer": settings.mpc.dealer,
        "session_setup_s": round(setup_s, 2),
        "client_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"cores": __import__("os").cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    if len(rows) >= 2:
        result["latency_ratio_last_vs_first_context"] = round(rows[-1]["decode_s_per_token"] / rows[0]["decode_s_per_token"], 2)
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"), f"{Path(args.model).name}, dealer={settings.mpc.dealer}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print("| context | cache s/token | recompute s/token | speedup | cache MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['decode_s_per_token']} | {r.get('recompute_s_per_token', '-')} | {r.get('speedup_cache_vs_recompute', '-')} | {r['cache_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
