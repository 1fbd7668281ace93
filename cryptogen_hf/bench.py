"""Secure generation latency against context length: encrypted cache vs recompute.

``cryptogen bench`` and ``scripts/bench_generation.py`` run this.

For each context length C the session is filled with C - 1 tokens in one
prefill pass, then the next tokens are decoded one at a time with the
encrypted KV cache (what generate() does). The recompute baseline (what a
secure-inference system without a cache does) re-runs the whole prefix of C
tokens for one new token. Both are measured in the same run, against the same
server, so their ratio is meaningful on a noisy machine.

Writes JSON (figures, per-component breakdown from both parties, bytes and
rounds, memory) and a PNG plot of latency against context.

    cryptogen bench --contexts 32 64 128 256 --out results/bench_generation.json

Also here: ``TokenTimer``, a generate() streamer that records when each token
arrives (the demo and the quickstart notebook use it for per-token latency).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli_common import CLIError, add_settings_arguments, local_model_dir, positive_int, settings_from_args
from .emulated_network import NETWORKS, EmulatedLink
from .families import family_for_config
from .protocol import credentials, transport


class TokenTimer:
    """A ``generate()`` streamer: a progress bar, and the time each new token arrived.

    ``probe``, if given, is called after each token and its values are kept in
    ``probes`` (e.g. ``lambda: cache.nbytes`` to follow the encrypted cache's size).
    """

    def __init__(self, total: int, desc: str = "secure generation", probe=None, progress: bool = True):
        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=not progress)
        self.probe = probe
        self.start = None
        self.times: list[float] = []
        self.probes: list = []

    def put(self, value):
        if self.start is None:  # generate() first sends the prompt
            self.start = time.perf_counter()
            return
        self.times.append(time.perf_counter())
        if self.probe is not None:
            self.probes.append(self.probe())
        self.bar.update(1)

    def end(self):
        self.bar.close()

    @property
    def first_token_s(self) -> float:
        """Prefill (the prompt in one pass) plus the first token."""
        return self.times[0] - self.start

    @property
    def latencies(self) -> list[float]:
        """Seconds for each token: the first includes the prefill, the rest are decode steps."""
        marks = [self.start] + self.times
        return [b - a for a, b in zip(marks, marks[1:])]


TRUST_MODELS = {
    "none": "two semi-honest parties, no dealer: correlated randomness made by the two of them (AND triples by OT extension, the rest by HE)",
    "client": "the client deals the MPC triples and sees every activation (weights treated as public)",
}


def _delta(after: dict, before: dict) -> dict:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 4) for k in after}


# Published shapes to time with random weights (--shape): the config class and
# its keyword arguments other than depth and vocabulary. The LLaMA-family
# shapes are those of SmolLM-135M and Llama-3.2-1B (grouped-query attention;
# Llama-3.2-1B's llama3 rotary scaling; its MLP of 8192 is wider than a HE row).
BENCH_SHAPES = {
    "gpt2-base": ("GPT2Config", dict(n_embd=768, n_head=12, n_positions=1024)),
    "smollm-135m": ("LlamaConfig", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                        max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}


def random_checkpoint(folder: Path, shape: str, n_layer: int, vocab_size: int) -> Path:
    """A model of a published shape (BENCH_SHAPES) with random weights
    (seeded), ``n_layer`` blocks and the given vocabulary, made once and reused.

    Timing needs the shape, not trained weights; nothing is downloaded."""
    import transformers

    config_class, kwargs = BENCH_SHAPES[shape]
    path = folder / f"{shape}-L{n_layer}-V{vocab_size}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        depth = {"n_layer": n_layer} if config_class == "GPT2Config" else {"num_hidden_layers": n_layer}
        config = getattr(transformers, config_class)(**kwargs, **depth, vocab_size=vocab_size,
                                                     bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
        transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


def measure_context(session, crypten, context: int, decode_tokens: int, recompute: bool, fill: bool = False,
                    recompute_token_by_token: bool = False) -> dict:
    """Decode latency at ``context`` with the encrypted cache (and, optionally, the
    recompute baseline). ``fill``: the first context - 1 cache entries are
    random encryptions (``ClientSession.fill_for_benchmark``) instead of a
    prefill: same decode work, none of the hours a long prefill takes."""
    generator = torch.Generator().manual_seed(context)
    tokens = torch.randint(1, session.shape.vocab_size, (context + decode_tokens,), generator=generator).tolist()
    session.reset()
    start = time.perf_counter()
    if fill:
        session.fill_for_benchmark(context - 1)
    else:
        session.forward(tokens[: context - 1], [False] * (context - 2) + [True])
    prefill_s = time.perf_counter() - start

    comm = crypten.communicator.get()
    comm.reset_communication_stats()
    channel = session.channel.stats
    sent0, recv0 = channel.bytes_sent, channel.bytes_received
    mpc0 = _mpc_channel_bytes(channel)
    server0 = session.stats()
    client0 = dict(session.runner.timings)
    correlations0 = session.correlation_stats()
    start = time.perf_counter()
    for i in range(decode_tokens):
        session.forward([tokens[context - 1 + i]], [True])
    decode_s = (time.perf_counter() - start) / decode_tokens
    server1 = session.stats()
    made = _delta(session.correlation_stats(), correlations0)
    mpc = comm.get_communication_stats()
    row = {
        "context": context,
        "prefill_tokens": context - 1,
        "prefill": "random cache fill" if fill else "secure prefill pass",
        "prefill_s": round(prefill_s, 3),
        "cache_layout_of_prefix": "outer" if session.runner.n_outer else "inner",
        "decode_s_per_token": round(decode_s, 3),
        # Making the correlated randomness (dealer "none"; the client's clock, so it
        # includes waiting for the server's HE work): the offline part, done when a
        # pool runs dry. The rest of the step is the online protocol.
        "correlation_s_per_token": round(made.get("seconds", 0.0) / decode_tokens, 3),
        "online_s_per_token": round(decode_s - made.get("seconds", 0.0) / decode_tokens, 3),
        "correlations_per_token": {k: made[k] / decode_tokens for k in ("arithmetic", "and_bits", "b2a_bits") if k in made},
        "server_breakdown_s_per_token": {k: round(v / decode_tokens, 4) for k, v in _delta(server1["timings"], server0["timings"]).items()},
        "client_breakdown_s_per_token": {k: round(v / decode_tokens, 4) for k, v in _delta(dict(session.runner.timings), client0).items()},
        "mpc_rounds_per_token": mpc["rounds"] / decode_tokens,
        "mpc_bytes_per_token": mpc["bytes"] / decode_tokens,
        # Everything crosses the one TLS connection: CrypTen's messages and the
        # correlation traffic (kind "mpc") and the protocol's ciphertexts.
        "channel_bytes_per_token": (channel.bytes_sent - sent0 + channel.bytes_received - recv0) / decode_tokens,
        "he_channel_bytes_per_token": (channel.bytes_sent - sent0 + channel.bytes_received - recv0 - (_mpc_channel_bytes(channel) - mpc0)) / decode_tokens,
        "circuit_privacy_s_per_token": round((server1.get("circuit_privacy_s", 0.0) - server0.get("circuit_privacy_s", 0.0)) / decode_tokens, 4),
        "cache_bytes": server1["cache_bytes"],
        "cache_tokens": server1["tokens"],
        "server_peak_rss_mb": server1.get("peak_rss_mb"),
        # The HE helpers' memory: proportional set size (shared pages divided
        # among their sharers) and private pages (what each adds; the weights it
        # shares with the session's process are not among them).
        "server_he_helpers_pss_mb": server1.get("he_helpers_pss_mb"),
        "server_he_helpers_private_mb": server1.get("he_helpers_private_mb"),
    }
    server_step = row["server_breakdown_s_per_token"]
    # The transformer blocks alone: the step less the token embedding and LM head
    # (which run once per token, whatever the depth).
    row["blocks_s_per_token"] = round(decode_s - server_step.get("embedding", 0.0) - server_step.get("lm_head", 0.0), 3)
    if recompute:
        # No cache: the whole prefix (context tokens) is processed for one new
        # token, as one packed pass (what a secure-inference system without a
        # cache does at best: BOLT packs the whole sequence), and optionally
        # token by token (one token per ciphertext, the older baseline).
        for name, packed in (("", True), ("_token_by_token", False)) if recompute_token_by_token else (("", True),):
            session.reset()
            start = time.perf_counter()
            session.forward(tokens[:context], [False] * (context - 1) + [True], packed=packed)
            row[f"recompute{name}_s_per_token"] = round(time.perf_counter() - start, 3)
            row[f"speedup_cache_vs_recompute{name}"] = round(row[f"recompute{name}_s_per_token"] / decode_s, 2)
    return row


def measure_prefill(session, crypten, length: int, packed: bool) -> dict:
    """Time to first token for a prompt of ``length`` tokens: one pass, packed or
    token by token, ending with the last position's logits opened to the client."""
    generator = torch.Generator().manual_seed(length)
    tokens = torch.randint(1, session.shape.vocab_size, (length,), generator=generator).tolist()
    session.reset()
    comm = crypten.communicator.get()
    comm.reset_communication_stats()
    channel = session.channel.stats
    sent0, recv0 = channel.bytes_sent, channel.bytes_received
    server0, client0 = session.stats(), dict(session.runner.timings)
    correlations0 = session.correlation_stats()
    start = time.perf_counter()
    session.forward(tokens, [False] * (length - 1) + [True], packed=packed)
    seconds = time.perf_counter() - start
    server1 = session.stats()
    made = _delta(session.correlation_stats(), correlations0)
    mpc = comm.get_communication_stats()
    return {
        "prompt_tokens": length,
        "path": "packed" if packed else "token by token",
        "time_to_first_token_s": round(seconds, 3),
        "correlation_s": round(made.get("seconds", 0.0), 3),
        "server_breakdown_s": {k: round(v, 3) for k, v in _delta(server1["timings"], server0["timings"]).items()},
        "client_breakdown_s": {k: round(v, 3) for k, v in _delta(dict(session.runner.timings), client0).items()},
        "mpc_rounds": mpc["rounds"],
        "channel_bytes": channel.bytes_sent - sent0 + channel.bytes_received - recv0,
        "server_peak_rss_mb": server1.get("peak_rss_mb"),
    }


def _mpc_channel_bytes(stats) -> int:
    return stats.bytes_sent_by_kind.get(transport.MPC_KIND, 0) + stats.bytes_received_by_kind.get(transport.MPC_KIND, 0)


def tls_cost(n_mib: int = 64) -> dict:
    """What TLS costs the session's channel on this machine: ``n_mib`` MiB of
    1 MiB messages over a loopback connection, plain and TLS 1.3, sender and
    receiver in two threads (the SSL calls release the GIL)."""
    cert, key = credentials.self_signed_certificate(["127.0.0.1"])
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "c.pem").write_bytes(cert)
        Path(tmp, "k.pem").write_bytes(key)
        server_tls = credentials.server_tls_context(Path(tmp, "c.pem"), Path(tmp, "k.pem"))
        client_tls = credentials.client_tls_context(cert)
        message = os.urandom(1 << 20)
        for name, (accept_tls, connect_tls) in {"plain": (None, None), "tls": (server_tls, client_tls)}.items():
            listener = transport.listen()
            accepted = {}
            acceptor = threading.Thread(target=lambda: accepted.setdefault("a", transport.accept(listener, "sender", 30, tls=accept_tls)))
            acceptor.start()
            sender = transport.connect("127.0.0.1", listener.getsockname()[1], "receiver", 30, tls=connect_tls)
            acceptor.join()
            receiver = accepted["a"]
            start = time.perf_counter()
            pushing = threading.Thread(target=lambda: [sender.send(transport.MPC_KIND, message) for _ in range(n_mib)])
            pushing.start()
            for _ in range(n_mib):
                receiver.recv(transport.MPC_KIND)
            pushing.join()
            seconds[name] = time.perf_counter() - start
            for c in (sender, receiver):
                c.close()
            listener.close()
    return {
        "plain_mib_per_s": round(n_mib / seconds["plain"], 1),
        "tls_mib_per_s": round(n_mib / seconds["tls"], 1),
        "tls_extra_s_per_mib": max(0.0, (seconds["tls"] - seconds["plain"]) / n_mib),
    }


def write_report(out: Path, result: dict, draw) -> None:
    """A benchmark's JSON at ``out``, its plot beside it (``draw(png_path)``), and where they went."""
    out.write_text(json.dumps(result, indent=2))
    draw(out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print(f"trust model: {result['trust_model']}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(contexts, [r["decode_s_per_token"] for r in rows], "o-", label="encrypted KV cache (CryptoGen)")
    if any(r.get("correlation_s_per_token") for r in rows):
        ax1.plot(contexts, [r["correlation_s_per_token"] for r in rows], "x:", label="of which: making correlated randomness")
    measured = [r for r in rows if "recompute_s_per_token" in r]
    if measured:
        ax1.plot([r["context"] for r in measured], [r["recompute_s_per_token"] for r in measured], "s--", label="recompute prefix (no cache)")
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
    plt.close(fig)


def plot_bars(rows: list[dict], path: Path, title: str) -> None:
    """``bench --net`` or several ``--he-workers``: per row (context, network,
    HE workers), the token's time (online and correlations stacked) and what
    it moved over the link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_workers = len({r["he_workers"] for r in rows}) > 1
    labels = [f"{r.get('network', 'loopback')}\nctx {r['context']}" + (f"\nHE x{r['he_workers']}" if several_workers else "")
              for r in rows]
    x = range(len(rows))
    online = [r["online_s_per_token"] for r in rows]
    correlations = [r["correlation_s_per_token"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.8 * len(rows)), 4.5))
    ax1.bar(x, online, label="online")
    ax1.bar(x, correlations, bottom=online, label="making correlated randomness")
    for i, r in enumerate(rows):
        ax1.annotate(f"{r['decode_s_per_token']:.1f} s", (i, r["decode_s_per_token"]), ha="center", va="bottom")
    ax1.set_ylim(0, 1.3 * max(r["decode_s_per_token"] for r in rows))  # room for the legend above the bars
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("seconds per generated token")
    ax1.set_title(title)
    ax1.legend(loc="upper left", ncol=2, fontsize="small")
    ax1.grid(alpha=0.3, axis="y")
    ax2.bar(x, [r["channel_bytes_per_token"] / 1e6 for r in rows], color="tab:gray")
    for i, r in enumerate(rows):
        ax2.annotate(f"{r['mpc_rounds_per_token']:.0f}\nrounds", (i, r["channel_bytes_per_token"] / 1e6), ha="center", va="bottom",
                     fontsize="small")
    ax2.set_ylim(0, 1.2 * max(r["channel_bytes_per_token"] for r in rows) / 1e6)
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("MB over the link per token")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_prefill(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for path_name, marker in (("packed", "o-"), ("token by token", "s--")):
        mine = [r for r in rows if r["path"] == path_name]
        if mine:
            ax1.plot([r["prompt_tokens"] for r in mine], [r["time_to_first_token_s"] for r in mine], marker, label=path_name)
    ax1.set_xlabel("prompt tokens")
    ax1.set_ylabel("time to first token (s)")
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(alpha=0.3)
    packed = [r for r in rows if r["path"] == "packed"]
    components = sorted({k for r in packed for k in r["server_breakdown_s"]}, key=lambda k: -max(r["server_breakdown_s"].get(k, 0) for r in packed))
    bottom = [0.0] * len(packed)
    x = list(range(len(packed)))  # one bar per prompt length, labelled with it
    for k in components:
        values = [r["server_breakdown_s"].get(k, 0.0) for r in packed]
        ax2.bar(x, values, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax2.set_xticks(x, [str(r["prompt_tokens"]) for r in packed])
    ax2.set_xlabel("prompt tokens (packed path)")
    ax2.set_ylabel("seconds (server's clock, by component)")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_prefill(args, model, model_dir: Path, settings, crypten, setup_s: float) -> int:
    """``cryptogen bench --prefill``: time to first token against prompt length,
    packed and token by token, in one run against one server."""
    out = Path(args.out or "results/bench_prefill.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    baseline = set(args.baseline_lengths if args.baseline_lengths is not None else args.lengths)
    rows = []
    session = model.session
    lengths = sorted(set(args.lengths))
    for length in tqdm(lengths, desc="prompt lengths", unit="prompt"):
        if length in baseline:
            rows.append(measure_prefill(session, crypten, length, packed=False))
            tqdm.write(json.dumps({k: rows[-1][k] for k in ("prompt_tokens", "path", "time_to_first_token_s")}))
        rows.append(measure_prefill(session, crypten, length, packed=True))
        tqdm.write(json.dumps({k: rows[-1][k] for k in ("prompt_tokens", "path", "time_to_first_token_s")}))
        if length in baseline:
            rows[-1]["packed_speedup"] = round(rows[-2]["time_to_first_token_s"] / rows[-1]["time_to_first_token_s"], 2)
            rows[-2]["packed_speedup"] = rows[-1]["packed_speedup"]
    # One decode step after the longest prompt (the packed pass just measured
    # left it in the cache), for the per-token latency beside it.
    longest = lengths[-1]
    start = time.perf_counter()
    session.forward([1 + longest % (session.shape.vocab_size - 1)], [True])
    decode_s = time.perf_counter() - start
    model.close()
    result = {
        "model": str(model_dir),
        "dealer": settings.mpc.dealer,
        "trust_model": TRUST_MODELS[settings.mpc.dealer],
        "session_setup_s": round(setup_s, 2),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "decode_s_per_token_after_longest_prompt": round(decode_s, 3),
        "rows": rows,
    }
    write_report(out, result, lambda png: plot_prefill(rows, png, f"{model_dir.name}, dealer={settings.mpc.dealer}"))
    print("| prompt tokens | packed TTFT s | token-by-token TTFT s | speedup |")
    print("|---|---|---|---|")
    for length in lengths:
        mine = {r["path"]: r for r in rows if r["prompt_tokens"] == length}
        base = mine.get("token by token")
        print(f"| {length} | {mine['packed']['time_to_first_token_s']} | {base['time_to_first_token_s'] if base else '-'} "
              f"| {mine['packed'].get('packed_speedup', '-')} |")
    print(f"decode step after a {longest}-token prompt: {decode_s:.2f} s")
    return 0


class _ArrivalLog:
    """A ``generate()`` streamer recording when each batch of new tokens
    arrived and how many (a speculative check delivers several at once)."""

    def __init__(self):
        self.arrivals: list[tuple[float, int]] = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.arrivals.append((time.perf_counter(), int(value.numel())))

    def end(self):
        pass


# Where a checkout keeps WikiText-2 (the project's shared corpora, beside the repository).
WIKITEXT_TEST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def speculative_prompts(tokenizer, n_prompts: int, prompt_tokens: int, text_file: Path | None) -> list[list[int]]:
    """Prompts from ``text_file`` (default: WikiText-2's test split, never trained
    on), 1,000 tokens apart; a fixed text where there is no such file."""
    text_file = text_file or WIKITEXT_TEST
    text = text_file.read_text(encoding="utf-8")[:400_000] if text_file.is_file() else SPECULATIVE_FALLBACK_TEXT * 40
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    step = max(prompt_tokens, min(1000, (len(ids) - prompt_tokens) // max(n_prompts, 1)))
    return [ids[i : i + prompt_tokens] for i in range(0, step * n_prompts, step)]


SPECULATIVE_FALLBACK_TEXT = (
    "The tower is 324 metres tall , about the same height as an 81 @-@ storey building , and the tallest "
    "structure in Paris . Its base is square , measuring 125 metres on each side . During its construction , "
    "the tower surpassed the Washington Monument to become the tallest man @-@ made structure in the world . "
)


def measure_generation(model, ids: list[int], new_tokens: int, prepare_tokens: int = 0, **options) -> dict:
    """One greedy generate() of ``new_tokens`` after ``ids`` in a new conversation:
    wall time, tokens, and the passes the server ran (asked, not decrypted).
    ``prepare_tokens``: first make the correlations of that many decode tokens
    (``prepare_correlations``, outside the timing), so that generate() runs
    the online protocol only."""
    from .hf.modeling import EncryptedCache

    session = model.session
    cache = EncryptedCache(model)  # a new conversation
    prepare_s = None
    if prepare_tokens:
        start = time.perf_counter()
        model.prepare_correlations(prepare_tokens)
        prepare_s = round(time.perf_counter() - start, 3)
    before = session.stats()
    log = _ArrivalLog()
    start = time.perf_counter()
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache=cache, streamer=log, **options)
    total = time.perf_counter() - start
    after = session.stats()
    (first_at, first_n), (last_at, _) = log.arrivals[0], log.arrivals[-1]
    passes = after["passes"] - before["passes"]
    return {
        "tokens": out[0, len(ids):].tolist(),
        "generate_s": round(total, 3),
        "first_pass_tokens_out": first_n,
        "after_first_s": round(last_at - first_at, 3),
        "tokens_after_first": new_tokens - first_n,
        "passes": passes,
        "tokens_run": after["tokens_processed"] - before["tokens_processed"],
        "prepare_correlations_s": prepare_s,
    }


def run_speculative(args, model, model_dir: Path, settings, setup_s: float) -> int:
    """``cryptogen bench --speculative DRAFT``: greedy generation with a
    plaintext draft model at the client (k drafted tokens checked per pass)
    and with prompt lookup, against ordinary greedy decoding, same prompts,
    same session. Every variant must give the ordinary tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out or "results/bench_speculative.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    draft = AutoModelForCausalLM.from_pretrained(local_model_dir(args.speculative)).eval()
    prompts = speculative_prompts(tokenizer, args.prompts, args.prompt_tokens, args.prompt_text)
    variants = [("greedy", {})]
    for k in args.draft_tokens:
        variants.append((f"draft k={k}", {"assistant_model": draft, "k": k}))
    variants.append((f"prompt lookup k={args.draft_tokens[-1]}", {"prompt_lookup_num_tokens": args.draft_tokens[-1]}))
    rows = []
    bar = tqdm(total=len(prompts) * len(variants), desc="speculative bench", unit="run")
    try:
        # A first conversation fills the correlation pools, so the first timed
        # variant does not pay the session's first batches; the order of the
        # variants rotates from prompt to prompt, so that none always runs on
        # what the previous one left in the pools.
        measure_generation(model, prompts[0], 2)
        # With --prepare-correlations every run first makes more correlations
        # than any variant uses (the prompt and k + 1 tokens per new token at the
        # largest k), so that all of them run online only.
        prepare = args.prompt_tokens + args.new_tokens * (max(args.draft_tokens) + 1) if args.prepare_correlations else 0
        for p, ids in enumerate(prompts):
            for name, options in variants[p % len(variants):] + variants[: p % len(variants)]:
                options = dict(options)
                k = options.pop("k", None)
                if k is not None:  # a constant number of drafted tokens per check
                    draft.generation_config.num_assistant_tokens = k
                    draft.generation_config.num_assistant_tokens_schedule = "constant"
                    draft.generation_config.assistant_confidence_threshold = 0.0
                row = {"prompt": p, "variant": name, **measure_generation(model, ids, args.new_tokens, prepare, **options)}
                rows.append(row)
                bar.update(1)
                tqdm.write(json.dumps({k: row[k] for k in ("prompt", "variant", "generate_s", "passes", "tokens_run")}))
    finally:
        bar.close()
        model.close()
    summary = []
    for name, _ in variants:
        mine = [r for r in rows if r["variant"] == name]
        greedy = [r for r in rows if r["variant"] == "greedy"]
        identical = all(m["tokens"] == g["tokens"] for m, g in zip(mine, greedy))
        generate_s = sum(r["generate_s"] for r in mine)
        after_s = sum(r["after_first_s"] for r in mine)
        after_tokens = sum(r["tokens_after_first"] for r in mine)
        summary.append({
            "variant": name,
            "identical_to_greedy": identical,
            "generate_s": round(generate_s, 2),
            "tokens_per_s": round(args.new_tokens * len(mine) / generate_s, 4),
            "tokens_per_s_after_first_pass": round(after_tokens / after_s, 4) if after_s else None,
            "new_tokens_per_pass": round(args.new_tokens * len(mine) / sum(r["passes"] for r in mine), 2),
            "tokens_run_per_new_token": round(sum(r["tokens_run"] for r in mine) / (args.new_tokens * len(mine)), 2),
        })
    base = summary[0]
    for row in summary:
        row["speedup_vs_greedy"] = round(base["generate_s"] / row["generate_s"], 2)
    result = {
        "model": str(model_dir),
        "draft": str(args.speculative),
        "dealer": settings.mpc.dealer,
        "trust_model": TRUST_MODELS[settings.mpc.dealer] + "; speculative variants also tell the server how many "
                       "drafted tokens each check accepted (generation.speculative_reveals_acceptance)",
        "session_setup_s": round(setup_s, 2),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "correlations": ("made beforehand for every run (prepare_correlations, not timed): online only"
                         if args.prepare_correlations else "made when the pools run dry, inside the timing"),
        "summary": summary,
        "rows": rows,
    }
    write_report(out, result, lambda png: plot_speculative(summary, png, f"{model_dir.name}, draft {Path(args.speculative).name}"))
    print("| variant | tokens/s | speedup | new tokens per pass | tokens run per new token | same tokens as greedy |")
    print("|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['variant']} | {row['tokens_per_s']} | {row['speedup_vs_greedy']}x | {row['new_tokens_per_pass']} "
              f"| {row['tokens_run_per_new_token']} | {row['identical_to_greedy']} |")
    if not all(row["identical_to_greedy"] for row in summary):
        print("ERROR: a speculative variant gave other tokens than greedy decoding")
        return 1
    return 0


def plot_speculative(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in summary]
    ax1.bar(names, [r["tokens_per_s"] for r in summary])
    ax1.set_ylabel("new tokens per second (whole generate())")
    ax1.set_title(title)
    ax2.bar(names, [r["new_tokens_per_pass"] for r in summary])
    ax2.set_ylabel("new tokens per secure pass")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line (cryptogen bench, scripts/bench_generation.py) ------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import SHIPPED_MODEL_DIR

    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="checkpoint folder (default: the shipped GPT-2)")
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES),
                        help="time a model of this published shape with random weights instead of --model")
    parser.add_argument("--layers", type=positive_int, default=12, help="with --shape: blocks (1 = one block)")
    parser.add_argument("--vocab", type=positive_int, default=50257, help="with --shape: vocabulary size")
    parser.add_argument("--fill", action="store_true",
                        help="fill the cache with random encryptions instead of a secure prefill (long contexts)")
    parser.add_argument("--recompute-contexts", type=positive_int, nargs="*", default=None,
                        help="run the recompute baseline only at these contexts (default: all; it costs a whole prefill each)")
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[32, 64, 128, 256],
                        help="context lengths to measure (each >= 2; default 32 64 128 256)")
    parser.add_argument("--decode-tokens", type=positive_int, default=2, help="decode steps timed per context")
    parser.add_argument("--no-recompute", action="store_true", help="skip the recompute baseline")
    parser.add_argument("--recompute-token-by-token", action="store_true",
                        help="also time the recompute baseline token by token (one token per ciphertext; slow)")
    parser.add_argument("--net", nargs="+", choices=list(NETWORKS), default=None,
                        help="run the server in a network namespace of its own behind an emulated link and measure each "
                             "context under each condition in turn, one session (loopback: unshaped; lan: 1 Gbit/s, "
                             "0.5 ms round trip; wan: 100 Mbit/s, 40 ms); needs root or CAP_NET_ADMIN")
    parser.add_argument("--he-workers", type=positive_int, nargs="+", default=[1],
                        help="processes sharing the server's HE work in each session (server.he_workers); several "
                             "values: a server and session for each in turn, same run (default 1)")
    parser.add_argument("--prefill", action="store_true",
                        help="measure time to first token against prompt length instead (packed and token by token)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[16, 32, 64, 128, 256, 512],
                        help="with --prefill: prompt lengths (default 16 32 64 128 256 512)")
    parser.add_argument("--baseline-lengths", type=positive_int, nargs="*", default=None,
                        help="with --prefill: run the token-by-token path only at these lengths (default: all)")
    parser.add_argument("--speculative", metavar="DRAFT", default=None,
                        help="measure greedy generation with this plaintext draft model at the client (and with prompt "
                             "lookup) against ordinary greedy decoding instead")
    parser.add_argument("--draft-tokens", type=positive_int, nargs="+", default=[1, 2, 3],
                        help="with --speculative: drafted tokens per check to try (default 1 2 3)")
    parser.add_argument("--prompts", type=positive_int, default=3, help="with --speculative: prompts (from WikiText-2 test)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=12, help="with --speculative: tokens per prompt")
    parser.add_argument("--prepare-correlations", action="store_true",
                        help="with --speculative: make each run's correlated randomness beforehand, outside the timing "
                             "(what prepare_correlations does while a user is idle): online figures")
    parser.add_argument("--prompt-text", type=Path, default=None,
                        help="with --speculative: text file the prompts are cut from (default: WikiText-2 test, if present)")
    parser.add_argument("--new-tokens", type=positive_int, default=12, help="with --speculative: tokens generated per prompt")
    add_settings_arguments(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output; the plot goes beside it as .png (default: results/bench_generation.json, "
                             "results/bench_prefill.json with --prefill, results/bench_speculative.json with --speculative)")


def run(args) -> int:
    from transformers import AutoConfig

    from .crypten_compat import import_crypten

    if args.shape:
        model_dir = random_checkpoint((Path(args.out).parent if args.out else Path("results")) / ".bench_models", args.shape,
                                      args.layers, args.vocab)
    else:
        model_dir = local_model_dir(args.model)
    hf_config = AutoConfig.from_pretrained(model_dir)
    context_limit = family_for_config(hf_config).shape_from_config(hf_config).n_positions
    if args.prefill:
        for length in args.lengths:
            if not 2 <= length <= context_limit - 1:
                raise CLIError(f"prompt length {length} must be in 2..{context_limit - 1} (the model's context minus the next token)")
    for context in [] if args.prefill or args.speculative else args.contexts:
        if not 2 <= context <= context_limit - args.decode_tokens:
            raise CLIError(f"context {context} must be in 2..{context_limit - args.decode_tokens} "
                           f"(model context {context_limit} minus --decode-tokens {args.decode_tokens})")
    if args.prefill and args.speculative:
        raise CLIError("--prefill and --speculative are two different benchmarks: give one")
    if args.net and (args.prefill or args.speculative):
        raise CLIError("--net goes with the latency benchmark (--contexts), not with --prefill or --speculative")
    if len(args.he_workers) > 1 and (args.prefill or args.speculative):
        raise CLIError("several --he-workers values go with the latency benchmark (--contexts), not with --prefill or --speculative")
    settings = settings_from_args(args)
    settings.server.he_workers = args.he_workers[0]
    if args.speculative:
        if args.prompt_tokens + args.new_tokens + max(args.draft_tokens) > context_limit:
            raise CLIError(f"--prompt-tokens + --new-tokens + the largest --draft-tokens exceed the model's context of {context_limit}")
        # The benchmark measures speculative decoding, which tells the server how
        # many drafted tokens each check accepted (the client's choice to make).
        settings.generation.speculative_reveals_acceptance = True
    crypten = import_crypten()
    if args.net:
        # A benchmark stopped with SIGTERM still stops its server and removes its namespace.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    crypten.config.cfg.communicator.verbose = True  # count rounds and bytes (this party's view)
    with EmulatedLink() if args.net else contextlib.nullcontext() as link:
        if not (args.prefill or args.speculative):
            return run_latency(args, model_dir, settings, crypten, link)
        start = time.perf_counter()
        model = _secure_model(link, model_dir, settings)
        setup_s = time.perf_counter() - start
        if args.prefill:
            return run_prefill(args, model, model_dir, settings, crypten, setup_s)
        return run_speculative(args, model, model_dir, settings, setup_s)


def _secure_model(link: EmulatedLink | None, model_dir: Path, settings):
    """A secure model with a local server: on loopback, or with ``link``, in the
    link's namespace, reached through its relay."""
    from .hf.modeling import CryptoGenForCausalLM, start_local_server
    from .protocol.session import ClientSession

    if link is None:
        return CryptoGenForCausalLM.from_pretrained(model_dir, settings=settings)
    proc, port, cert, token = start_local_server(model_dir, settings, host=link.server_host, prefix=link.server_prefix)
    try:
        session = ClientSession("127.0.0.1", link.forward(port), settings, server_cert=cert, token=token)
    except BaseException:
        proc.kill()
        raise
    return CryptoGenForCausalLM.from_session(session, server_process=proc)


def run_latency(args, model_dir: Path, settings, crypten, link: EmulatedLink | None) -> int:
    """Decode latency (and the recompute baseline) at each context; with ``link``,
    at each context under each of ``args.net``'s network conditions in turn, one
    session throughout; for each of ``args.he_workers`` in turn, a server and
    session of its own (the baseline under the first only)."""
    out = Path(args.out or "results/bench_generation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, setup_s = [], {}
    for workers in args.he_workers:
        settings.server.he_workers = workers
        start = time.perf_counter()
        model = _secure_model(link, model_dir, settings)
        setup_s[workers] = round(time.perf_counter() - start, 2)
        try:
            for context in tqdm(args.contexts, desc=f"contexts, {workers} HE worker(s)", unit="ctx"):
                recompute = (not args.no_recompute and (args.recompute_contexts is None or context in args.recompute_contexts)
                             and workers == args.he_workers[0])
                networks = args.net or [None]
                for name in networks:
                    link_figures = link.set(NETWORKS[name]) if name else None
                    # The recompute baseline compares work, not links: under the first condition only.
                    rows.append(measure_context(model.session, crypten, context, args.decode_tokens, recompute and name == networks[0],
                                                args.fill, args.recompute_token_by_token))
                    rows[-1]["he_workers"] = workers
                    if name:
                        rows[-1].update(network=name, network_emulated=NETWORKS[name].describe(), network_measured=link_figures)
                    tqdm.write(json.dumps({k: rows[-1][k] for k in ("context", "network", "he_workers", "decode_s_per_token",
                                                                      "recompute_s_per_token") if k in rows[-1]}))
            cipher = model.session.channel.sock.cipher()
            shape = model.session.shape.to_dict()
        finally:
            model.close()
    if len(args.he_workers) > 1:
        first = {(r["context"], r.get("network")): r["decode_s_per_token"] for r in rows if r["he_workers"] == args.he_workers[0]}
        for r in rows:
            r["speedup_vs_first_he_workers"] = round(first[(r["context"], r.get("network"))] / r["decode_s_per_token"], 2)
    tls = tls_cost()
    for r in rows:  # an estimate: the measured per-byte cost of TLS times the bytes each token moved
        r["tls_s_per_token_estimate"] = round(tls["tls_extra_s_per_mib"] * r["channel_bytes_per_token"] / 2**20, 3)
    result = {
        "model": str(model_dir),
        "shape": shape,
        "dealer": settings.mpc.dealer,
        "trust_model": TRUST_MODELS[settings.mpc.dealer],
        "session_setup_s_by_he_workers": setup_s,
        "transport": {"protocol": cipher[1], "cipher": cipher[0], **tls},
        "client_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    if link is not None:
        result["network_emulation"] = ("server in a network namespace of its own, linked to the client by a veth pair; "
                                       "rate: tbf on both ends; round trip: a delay relay on the client's side "
                                       "(this kernel has no sch_netem); each condition measured on the link before use")
    elif len(args.contexts) >= 2:
        first = [r for r in rows if r["he_workers"] == args.he_workers[0]]
        result["latency_ratio_last_vs_first_context"] = round(first[-1]["decode_s_per_token"] / first[0]["decode_s_per_token"], 2)
    draw = plot_bars if link is not None or len(args.he_workers) > 1 else plot
    write_report(out, result, lambda png: draw(rows, png, f"{model_dir.name}, dealer={settings.mpc.dealer}"))
    print(f"transport: {cipher[1]} {cipher[0]}, {tls['tls_mib_per_s']} MiB/s (plain socket {tls['plain_mib_per_s']} MiB/s)")
    print("| context | network | HE workers | cache s/token | of which correlations | recompute s/token | speedup | MiB moved/token | rounds/token | cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r.get('network', 'loopback, one namespace')} | {r['he_workers']} | {r['decode_s_per_token']} | {r['correlation_s_per_token']} "
              f"| {r.get('recompute_s_per_token', '-')} | {r.get('speedup_cache_vs_recompute', '-')} "
              f"| {r['channel_bytes_per_token'] / 2**20:.1f} | {r['mpc_rounds_per_token']:.0f} | {r['cache_bytes'] / 2**20:.1f} |")
    return 0
