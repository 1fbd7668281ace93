#!/usr/bin/env python3
"""The benchmark of the secure engine's building blocks, on one thread.

Sections (--sections, default all four):

he       every BFV kernel, in this process (server and client objects side by
         side, one SEAL thread, torch.set_num_threads(1)): decode matvec at
         GPT-2-base shapes (768x768, 768x2304, 768x3072, 3072x768) and at the
         shipped small model's shapes (d=192, vocab 4096: 192x576, 192x192,
         192x768, 768x192, 192x4096 and the one-hot embedding 4096x192);
         packed matvec (several tokens per ciphertext, a prompt's pass); attention q.K^T and probs.V against the encrypted
         cache for contexts 64..512, GPT-2-base in both layouts
         (OuterAttentionPlan/OuterKVCache and InnerKVCache), small model in the
         inner layout. Every result is decrypted and checked exactly against
         numpy ("exact").
mpc      softmax (12,1,ctx) and (4,1,ctx) for ctx 64..512, GELU 3072/768,
         LayerNorm 768/192 through real processes (launch_local), in each
         dealer mode (--dealers), with CrypTen's rounds and bytes (both parties).
convert  shares_to_he / he_to_shares for 768 and 3072 values in the decode
         matvec layouts (MatvecIO) through two processes, with CrypTen's rounds
         and bytes and the side channel's messages and bytes.
scaling  q.K^T and probs.V over a GPT-2-base inner cache at context 512, its
         blocks split over 1 and 2 worker processes running at once: what
         sharding a session's HE over processes could gain here.

Then the goals of the issue (one core) are checked and marked PASS/MISS:
768x768 decode product <= 0.3 s; 3072x768 <= 0.6 s; q.K^T + probs.V for 12
heads at context 512 (better layout) + MPC softmax (12,1,512) <= 2 s.

Every figure is the median of --repeats calls, measured with
time.perf_counter (MPC and conversions at the server process). Writes JSON
(--out: machine, library versions, every figure as {"value", "unit"}) and
prints markdown tables.

    python scripts/bench_kernels.py [--quick] [--repeats 3] [--out results/bench_kernels.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cryptogen_hf.mpc.runtime import CLIENT, DEALER_MODES, SERVER, MPCConfig, launch_local, rank_of  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("he", "mpc", "convert", "scaling")
CONTEXTS = (64, 128, 256, 512)
# (label, heads, head_dim); d = heads * head_dim
BASE = ("gpt2-base", 12, 64)
SMALL = ("small", 4, 48)
GOALS = {"matvec_768x768_s": 0.3, "matvec_3072x768_s": 0.6, "attention_ctx512_s": 2.0}


# ---------------------------------------------------------------------------
# Shared timing / reporting helpers (also used by bench_he_kernels.py and
# bench_mpc_ops.py, which are thin wrappers around this script).
# ---------------------------------------------------------------------------
def time_calls(fn, repeats: int):
    """Call fn() `repeats` times; (median seconds, all seconds, last result)."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def fig(value, unit: str) -> dict:
    """One figure with its unit, as stored in the JSON."""
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return {"value": value, "unit": unit}


def row(section: str, name: str, shape: str, **figures) -> dict:
    return {"section": section, "name": name, "shape": shape, "figures": figures}


def value(r: dict, key: str, default=None):
    f = r["figures"].get(key)
    return default if f is None else f["value"]


def machine_info() -> dict:
    versions = {}
    for pkg in ("torch", "tenseal", "crypten", "numpy", "tqdm"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "versions": versions,
    }


# ---------------------------------------------------------------------------
# HE kernels (one process)
# ---------------------------------------------------------------------------
def he_cases(quick: bool) -> list[tuple]:
    """("matvec", d_in, d_out, label) | ("packed", d_in, d_out) | ("attention", layout, model, T)."""
    if quick:
        return [("matvec", 192, 192, "small attn.c_proj"), ("matvec", 768, 768, "base attn.c_proj"),
                ("attention", "inner", SMALL, 64), ("attention", "outer", BASE, 64)]
    cases = [("matvec", 768, 768, "base attn.c_proj"), ("matvec", 768, 2304, "base attn.c_attn"),
             ("matvec", 768, 3072, "base mlp.c_fc"), ("matvec", 3072, 768, "base mlp.c_proj"),
             ("matvec", 192, 576, "small attn.c_attn"), ("matvec", 192, 192, "small attn.c_proj"),
             ("matvec", 192, 768, "small mlp.c_fc"), ("matvec", 768, 192, "small mlp.c_proj"),
             ("matvec", 192, 4096, "small lm_head"), ("matvec", 4096, 192, "small one-hot embedding")]
    cases += [("packed", 192, 576), ("packed", 192, 192), ("packed", 192, 768), ("packed", 768, 192),
              ("packed", 768, 768), ("packed", 768, 2304)]
    cases += [("attention", layout, BASE, T) for layout in ("outer", "inner") for T in CONTEXTS]
    cases += [("attention", "inner", SMALL, T) for T in CONTEXTS]
    return cases


class HEBench:
    """Client and server HE objects with the Galois keys of every planned kernel."""

    def __init__(self, cases):
        from cryptogen_hf.he import ClientHE, HEParams, InnerKVCache, MatvecPlan, OuterAttentionPlan, ServerHE
        from cryptogen_hf.protocol.decoder import packed_plan

        self.params = HEParams()
        self.rng = np.random.default_rng(0)
        self.plans, steps = {}, set()
        for case in cases:
            kind = case[0]
            if kind == "matvec":
                plan = MatvecPlan(case[1], case[2], self.params)
            elif kind == "packed":
                plan = packed_plan(case[1], case[2], self.params)
            elif case[1] == "outer":
                plan = OuterAttentionPlan(case[2][1], case[2][2], case[3], self.params)
            else:  # shape-only here (for the Galois steps); the cache itself is built in _attention
                plan = InnerKVCache(case[2][1], case[2][2], self.params)
            self.plans[case] = plan
            steps |= plan.galois_steps()
        self.client = ClientHE(self.params)
        t_keys, _, bundle = time_calls(lambda: self.client.public_bundle(steps), 1)
        self.server = ServerHE.from_bundle(bundle)
        self.setup_row = row("he", "key bundle (public, relin, galois)", f"{len(steps)} galois steps",
                             keygen_s=fig(t_keys, "s"), bundle_bytes=fig(len(bundle), "B"))
        self._inner_caches = {}

    def ints(self, shape, bound, low=None):
        return self.rng.integers(-bound if low is None else low, bound, shape)

    def enc_bytes(self, cts) -> int:
        return sum(len(self.client.serialize_ct(c)) for c in cts)

    def run(self, case, repeats) -> dict:
        return getattr(self, "_" + case[0])(case, self.plans[case], repeats)

    def _matvec(self, case, plan, repeats):
        _, d_in, d_out, label = case
        W = self.ints((d_in, d_out), 8192)
        t_enc, _, enc = time_calls(lambda: plan.encode_weights(self.server, W), 1)
        if "one-hot" in label:
            x = np.zeros(d_in, dtype=np.int64)
            x[int(self.rng.integers(d_in))] = 1 << 12
        else:
            x = self.ints(d_in, 8192)
        ct = self.client.encrypt(plan.pack_input(x))
        t, times, outs = time_calls(lambda: plan.apply(self.server, enc, ct), repeats)
        y = plan.unpack_output([self.client.decrypt_centered(o) for o in outs])
        return row("he", f"decode matvec ({label})", f"{d_in}x{d_out}",
                   time_s=fig(t, "s"), time_all_s=fig(times, "s"), encode_weights_s=fig(t_enc, "s"),
                   in_bytes=fig(self.enc_bytes([ct]), "B"), out_bytes=fig(self.enc_bytes(outs), "B"),
                   out_cts=fig(len(outs), "ciphertexts"), c=fig(plan.c, "count"), K=fig(plan.K, "count"),
                   n1=fig(plan.n1, "count"), rotation_keys=fig(len(plan.galois_steps()), "count"),
                   exact=fig(bool(np.array_equal(y, x @ W)), "bool"))

    def _packed(self, case, plan, repeats):
        _, d_in, d_out = case
        W = self.ints((d_in, d_out), 8192)
        t_enc, _, enc = time_calls(lambda: plan.encode_weights(self.server, W), 1)
        X = self.ints((plan.tokens, d_in), 8192)
        ct = self.client.encrypt(plan.pack_rows(X))
        t, times, outs = time_calls(lambda: plan.apply(self.server, enc, ct), repeats)
        Y = plan.unpack_rows([self.client.decrypt_centered(o) for o in outs])
        return row("he", "packed matvec", f"{plan.tokens} tokens {d_in}x{d_out}",
                   time_s=fig(t, "s"), time_all_s=fig(times, "s"), time_per_token_s=fig(t / plan.tokens, "s"),
                   encode_weights_s=fig(t_enc, "s"), tokens_per_ciphertext=fig(plan.tokens, "count"),
                   out_cts=fig(len(outs), "ciphertexts"), c=fig(plan.c, "count"), K=fig(plan.K, "count"),
                   exact=fig(bool(np.array_equal(Y, X @ W)), "bool"))

    def _attention(self, case, plan, repeats):
        _, layout, model, T = case
        label, H, dh = model
        q = self.ints((H, dh), 4096)
        P = self.ints((H, T), 4096, low=0)
        if layout == "outer":
            K, V = self.ints((T, H, dh), 4096), self.ints((T, H, dh), 4096)
            from cryptogen_hf.he import OuterKVCache

            def enc_diags(packed):
                D, nz = packed
                return [[self.client.encrypt(D[g, b]) if nz[g, b] else None for b in range(D.shape[1])] for g in range(D.shape[0])]

            cache = OuterKVCache(plan, enc_diags(plan.pack_keys(K)), enc_diags(plan.pack_values(V)), self.server.noise_model.fresh)
            q_ct = self.client.encrypt(plan.pack_query(q))
            p_cts = [self.client.encrypt(plan.pack_probs(P))]
            t1, times1, s_ct = time_calls(lambda: plan.scores(self.server, cache, q_ct), repeats)
            t2, times2, o_ct = time_calls(lambda: plan.attend(self.server, cache, p_cts[0]), repeats)
            scores = plan.unpack_scores(self.client.decrypt_centered(s_ct))
            out = plan.unpack_out(self.client.decrypt_centered(o_ct))
            s_cts, extra = [s_ct], {}
        else:
            # One growing inner cache per model: contexts are benchmarked in increasing order.
            if label not in self._inner_caches:
                from cryptogen_hf.he import InnerKVCache

                empty = np.zeros((0, H * dh), np.int64)
                self._inner_caches[label] = (InnerKVCache(H, dh, self.params, self.server.noise_model), empty, empty)
            cache, K, V = self._inner_caches[label]
            while cache.n_tokens < T:
                t = cache.n_tokens
                k, v = self.ints(H * dh, 4096), self.ints(H * dh, 4096)
                cache.append(self.server, self.client.encrypt(cache.pack_token(k, t)), self.client.encrypt(cache.pack_token(v, t)))
                K, V = np.vstack([K, k]), np.vstack([V, v])
            self._inner_caches[label] = (cache, K, V)
            K, V = K[:T].reshape(T, H, dh), V[:T].reshape(T, H, dh)
            q_ct = self.client.encrypt(cache.pack_query(q.reshape(-1)))
            p_cts = [self.client.encrypt(x) for x in cache.pack_probs(P, T)]
            t1, times1, s_cts = time_calls(lambda: cache.scores(self.server, q_ct), repeats)
            t2, times2, o_ct = time_calls(lambda: cache.attend(self.server, p_cts), repeats)
            scores = cache.unpack_scores([self.client.decrypt_centered(c) for c in s_cts], T)
            out = cache.unpack_out(self.client.decrypt_centered(o_ct))
            extra = {"blocks": fig(len(cache.k_cts), "ciphertexts per K (and V)"), "tokens_per_block": fig(cache.B, "tokens")}
        exact = np.array_equal(scores, np.einsum("thj,hj->ht", K, q)) and np.array_equal(out, np.einsum("ht,thj->hj", P, V))
        return row("he", f"attention {layout} ({label})", f"H={H} dh={dh} T={T}",
                   time_s=fig(t1 + t2, "s"), scores_s=fig(t1, "s"), pv_s=fig(t2, "s"),
                   scores_all_s=fig(times1, "s"), pv_all_s=fig(times2, "s"),
                   cache_bytes=fig(cache.nbytes, "B"),
                   in_bytes=fig(self.enc_bytes([q_ct] + p_cts), "B"),
                   out_bytes=fig(self.enc_bytes(list(s_cts) + [o_ct]), "B"),
                   exact=fig(bool(exact), "bool"), **extra)


def run_he(cases, repeats, bar) -> list[dict]:
    torch.set_num_threads(1)
    bar.set_description("he: keys")
    bench = HEBench(cases)
    rows = [bench.setup_row]
    bar.update(1)
    for case in cases:
        bar.set_description(f"he: {case[0]} {case[1:]}")
        rows.append(bench.run(case, repeats))
        bar.update(1)
    return rows


# ---------------------------------------------------------------------------
# Scaling over processes: what sharding one session's HE work over worker
# processes (tensor-parallel HE, issue 17) could gain on this machine. SEAL
# holds the GIL, so the shards must be processes.
# ---------------------------------------------------------------------------
SCALING_CONTEXT = 512
SCALING_WORKERS = (1, 2)


def _attention_shard(tokens: int, repeats: int, barrier, results) -> None:
    """One worker process: its own keys and an inner cache of ``tokens`` tokens
    (its share of the cache blocks), then q.K^T and p.V timed once every
    worker is ready, so that the shards run at the same time."""
    torch.set_num_threads(1)
    case = ("attention", "inner", BASE, tokens)
    bench = HEBench([case])
    bench.run(case, 1)  # builds the cache (and warms up)
    barrier.wait()
    results.put(bench.run(case, repeats))


def run_scaling(repeats, bar) -> list[dict]:
    """Attention over a GPT-2-base inner cache at context SCALING_CONTEXT,
    its blocks split evenly over 1 and 2 worker processes that run at once."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows, alone = [], None
    for workers in SCALING_WORKERS:
        bar.set_description(f"scaling: {workers} process(es)")
        barrier, results = ctx.Barrier(workers), ctx.Queue()
        tokens = SCALING_CONTEXT // workers
        procs = [ctx.Process(target=_attention_shard, args=(tokens, repeats, barrier, results)) for _ in range(workers)]
        for proc in procs:
            proc.start()
        shards = [results.get(timeout=1800) for _ in procs]
        for proc in procs:
            proc.join()
        # The sharded kernel takes as long as its slowest shard (the session would add the shards' sums).
        t = max(value(r, "time_s") for r in shards)
        alone = t if workers == 1 else alone
        rows.append(row("scaling", f"attention inner ({BASE[0]}) over {workers} process(es)",
                        f"H={BASE[1]} dh={BASE[2]} T={SCALING_CONTEXT}, {tokens} tokens each",
                        time_s=fig(t, "s"), shard_times_s=fig([value(r, "time_s") for r in shards], "s"),
                        speedup_vs_one_process=fig(alone / t, "x"),
                        exact=fig(all(value(r, "exact") for r in shards), "bool")))
        bar.update(1)
    return rows


# ---------------------------------------------------------------------------
# MPC non-linear ops (server + client [+ TTP dealer] processes)
# ---------------------------------------------------------------------------
def mpc_cases(quick: bool) -> list[tuple]:
    """(name, op, shape) for every benchmarked call."""
    if quick:
        return [("softmax_base_h12_ctx64", "softmax", (12, 1, 64)), ("layer_norm_192", "layer_norm", (1, 192))]
    cases = []
    for heads, label in ((12, "base"), (4, "small")):
        for n in CONTEXTS:
            cases.append((f"softmax_{label}_h{heads}_ctx{n}", "softmax", (heads, 1, n)))
    cases.append(("gelu_3072", "gelu", (1, 3072)))
    cases.append(("gelu_768", "gelu", (1, 768)))
    cases.append(("layer_norm_768", "layer_norm", (1, 768)))
    cases.append(("layer_norm_192", "layer_norm", (1, 192)))
    return cases


def mpc_input(op, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if op == "softmax":
        s = torch.randn(*shape, generator=g) * 3.0
        s[..., 0] += 12.0  # attention sink, as in GPT-2
        return s
    if op == "gelu":
        return torch.randn(*shape, generator=g) * 3.0
    # layer_norm: GPT-2-like residual row with an outlier dimension
    x = torch.randn(*shape, generator=g) * 20.0
    x[..., 5] = 1000.0
    return x


def _mpc_op(op, x):
    """(secure function, float reference) for one op."""
    from cryptogen_hf.mpc import ops

    if op == "softmax":
        return ops.softmax, torch.softmax(x, -1)
    if op == "gelu":
        return ops.gelu, ops.gelu_reference(x)
    scale = ops.calibrate_pre_scale(x)
    return (lambda z: ops.layer_norm(z, pre_scale=scale)), ops.layer_norm_reference(x)


def _crypten_comm():
    from cryptogen_hf.crypten_compat import import_crypten

    crypten = import_crypten()
    from crypten.config import cfg

    cfg.communicator.verbose = True  # CrypTen counts rounds/bytes only when verbose
    return crypten, crypten.communicator.get()


def _correlation_seconds() -> float:
    """Seconds this party has spent making correlated randomness (dealer "none"; 0 otherwise)."""
    from cryptogen_hf.mpc.runtime import correlation_provider

    return getattr(correlation_provider(), "stats", {}).get("seconds", 0.0)


def _measured(comm, fn, channel=None):
    """Time fn() between two barriers' worth of reset stats: (seconds, result, crypten stats, channel stats).
    The crypten stats gain "correlation_s": the part of the time spent making correlated
    randomness (the offline phase, done inline when a pool runs dry)."""
    comm.barrier()
    comm.reset_communication_stats()
    if channel is not None:
        channel.stats.reset()
    c0 = _correlation_seconds()
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    stats = dict(comm.get_communication_stats(), correlation_s=_correlation_seconds() - c0)
    # The protocol's own messages (CrypTen's share the connection as kind "mpc", counted in stats).
    ch = None if channel is None else {"bytes": channel.stats.bytes_sent - channel.stats.bytes_sent_by_kind.get("mpc", 0),
                                       "messages": channel.stats.messages_sent}
    return dt, result, stats, ch


def mpc_program(role, cases, repeats, progress=None):
    """SPMD body: every case `repeats` times; per case this party's times, stats and error."""
    crypten, comm = _crypten_comm()
    rows = []
    for i, (name, op, shape) in enumerate(cases):
        x = mpc_input(op, shape, seed=i)
        fn, ref = _mpc_op(op, x)
        times, correlation, stats, err = [], [], None, None
        for _ in range(repeats):
            ex = crypten.cryptensor(x if role == CLIENT else torch.zeros_like(x), src=rank_of(CLIENT))
            dt, y, stats, _ = _measured(comm, lambda: fn(ex))
            times.append(dt)
            correlation.append(stats["correlation_s"])
            err = (y.get_plain_text() - ref).abs().max().item()
        rows.append({"name": name, "op": op, "shape": list(shape), "times": times, "correlation_s": correlation,
                     "rounds": int(stats["rounds"]), "bytes": int(stats["bytes"]), "max_abs_err": err})
        _report_progress(progress, role, name)
    return rows


def _report_progress(progress_path, role, name) -> None:
    """The server appends each finished case to the progress file the parent follows."""
    if progress_path is not None and role == SERVER:
        with open(progress_path, "a") as f:
            f.write(name + "\n")


def _launch_with_progress(fn, config, args, bar, label, wall_timeout_s=1800):
    """launch_local(fn, config, args + (progress file,)); each line the server appends advances the bar."""
    fd, progress_path = tempfile.mkstemp(prefix="cryptogen-bench-progress-")
    os.close(fd)
    done = threading.Event()

    def follow():
        seen = 0
        while not done.is_set():
            time.sleep(0.2)
            with open(progress_path) as f:
                names = f.read().splitlines()
            for name in names[seen:]:
                bar.set_description(f"{label}: {name}")
                bar.update(1)
            seen = len(names)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        return launch_local(fn, config, tuple(args) + (progress_path,), wall_timeout_s=wall_timeout_s)
    finally:
        time.sleep(0.3)
        done.set()
        thread.join()
        os.unlink(progress_path)


def run_mpc(dealer, cases, repeats, bar) -> list[dict]:
    bar.set_description(f"mpc[{dealer}]: starting")
    res = _launch_with_progress(mpc_program, MPCConfig(dealer=dealer, timeout_s=300), (cases, repeats), bar, f"mpc[{dealer}]")
    rows = []
    for s, c in zip(res[SERVER], res[CLIENT]):
        rows.append(row("mpc", f"{s['name']} [{dealer}]", str(tuple(s["shape"])),
                        time_s=fig(statistics.median(s["times"]), "s"), time_all_s=fig(s["times"], "s"),
                        correlation_s=fig(statistics.median(s["correlation_s"]), "s"),
                        online_s=fig(statistics.median(t - c for t, c in zip(s["times"], s["correlation_s"])), "s"),
                        rounds=fig(s["rounds"], "rounds"), bytes_server=fig(s["bytes"], "B"),
                        bytes_client=fig(c["bytes"], "B"), bytes_total=fig(s["bytes"] + c["bytes"], "B"),
                        max_abs_err=fig(s["max_abs_err"], "abs")))
        rows[-1].update(op=s["op"], dealer=dealer, case=s["name"])
    return rows


# ---------------------------------------------------------------------------
# HE <-> shares conversions (two processes + dealer)
# ---------------------------------------------------------------------------
def convert_cases(quick: bool) -> list[int]:
    return [768] if quick else [768, 3072]


def _conversion_helpers():
    """tests/test_conversions.py: ``_open_party`` (channel + HE keys for one role) and
    ``_reveal_ring`` (exact opening; CrypTen's float32 get_plain_text is lossy above ~2^24)."""
    spec = importlib.util.spec_from_file_location("_bench_test_conversions", os.path.join(REPO, "tests", "test_conversions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert_program(role, sizes, repeats, progress=None):
    """shares_to_he into a decode matvec's input layout (n x 768) and he_to_shares out of
    its output layout (768 x n), n values each, `repeats` times."""
    from cryptogen_hf.he import MatvecPlan
    from cryptogen_hf.protocol.convert import he_to_shares, shares_to_he
    from cryptogen_hf.protocol.layouts import MatvecIO

    crypten, comm = _crypten_comm()
    helpers = _conversion_helpers()
    party = helpers._open_party(role)
    he, p = party.he, party.he.p
    rows = []
    for n in sizes:
        into = MatvecIO(MatvecPlan(n, 768, he.params))
        out_of = MatvecIO(MatvecPlan(768, n, he.params))
        x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 10.0
        ints = torch.randint(-(2**30), 2**30, (n,), generator=torch.Generator().manual_seed(n + 1))
        for direction in ("shares_to_he", "he_to_shares"):
            times, stats, ch, err = [], None, None, None
            for _ in range(repeats):
                if direction == "shares_to_he":
                    xs = crypten.cryptensor(x if party.is_client else torch.zeros(n), src=rank_of(CLIENT))
                    fn = lambda: shares_to_he(party, xs, into, frac_bits=12)  # noqa: E731
                else:
                    cts = None
                    if party.is_server:  # the server encrypts known test values with the public key
                        slots = np.zeros((out_of.plan.n_tiles, he.slot_count), dtype=np.int64)
                        for t, lay in enumerate(out_of.plan.tiles):
                            mine = lay.out_index < n
                            slots[t, lay.out_slot[mine]] = ints.numpy()[lay.out_index[mine]]
                        cts = [he.encrypt(s % p) for s in slots]
                    fn = lambda: he_to_shares(party, cts, out_of, frac_bits=12, n=n)  # noqa: E731
                dt, y, stats, ch = _measured(comm, fn, party.channel)
                times.append(dt)
                if direction == "he_to_shares":
                    # exact, in units of 2^-16 (CrypTen's fixed point): 12 -> 16 fractional bits
                    err = (helpers._reveal_ring(y) - ints * 2**4).abs().max().item()
            rows.append({"name": f"{direction}_{n}", "direction": direction, "n": n, "times": times,
                         "rounds": int(stats["rounds"]), "bytes": int(stats["bytes"]),
                         "channel_bytes": ch["bytes"], "channel_messages": ch["messages"], "max_abs_err": err,
                         "in_cts": len(into.plan.tiles[:1]) if direction == "shares_to_he" else out_of.plan.n_tiles})
            _report_progress(progress, role, rows[-1]["name"])
    party.channel.close()
    return rows


def run_convert(sizes, repeats, bar, dealer="ttp") -> list[dict]:
    bar.set_description("convert: starting")
    config = MPCConfig(dealer=dealer, timeout_s=300)
    res = _launch_with_progress(convert_program, config, (sizes, repeats), bar, "convert")
    rows = []
    for s, c in zip(res[SERVER], res[CLIENT]):
        r = row("convert", f"{s['direction']} (MatvecIO) [{dealer}]", f"{s['n']} values",
                time_s=fig(statistics.median(s["times"]), "s"), time_all_s=fig(s["times"], "s"),
                rounds=fig(s["rounds"], "rounds (CrypTen)"), bytes_total=fig(s["bytes"] + c["bytes"], "B (CrypTen)"),
                channel_messages=fig(s["channel_messages"] + c["channel_messages"], "messages"),
                channel_bytes=fig(s["channel_bytes"] + c["channel_bytes"], "B"),
                ciphertexts=fig(s["in_cts"], "ciphertexts"))
        if s["max_abs_err"] is not None:
            r["figures"]["max_abs_err"] = fig(s["max_abs_err"], "units of 2^-16")
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------
# Goals, tables, CLI
# ---------------------------------------------------------------------------
def _find(rows, section, name_part, shape):
    for r in rows:
        if r["section"] == section and name_part in r["name"] and r["shape"] == shape:
            return r
    return None


def check_goals(rows) -> list[dict]:
    goals = []

    def verdict(measured, limit):
        return "n/a" if measured is None else ("PASS" if measured <= limit else "MISS")

    for shape, key in (("768x768", "matvec_768x768_s"), ("3072x768", "matvec_3072x768_s")):
        r = _find(rows, "he", "decode matvec", shape)
        t = value(r, "time_s") if r else None
        goals.append({"goal": f"decode product {shape} <= {GOALS[key]} s (one core)", "limit_s": GOALS[key],
                      "measured_s": t, "parts": {"he_kernel_s": t}, "verdict": verdict(t, GOALS[key])})
    shape = f"H={BASE[1]} dh={BASE[2]} T=512"
    layouts = {lay: _find(rows, "he", f"attention {lay} ({BASE[0]})", shape) for lay in ("outer", "inner")}
    layouts = {k: v for k, v in layouts.items() if v is not None}
    best = min(layouts, key=lambda k: value(layouts[k], "time_s")) if layouts else None
    dealers = sorted({r["dealer"] for r in rows if r["section"] == "mpc"}) or ["ttp"]
    for dealer in dealers:
        sm = _find(rows, "mpc", f"softmax_base_h12_ctx512 [{dealer}]", "(12, 1, 512)")
        parts = {}
        if best is not None:
            parts.update({f"{k}_layout_s": value(v, "time_s") for k, v in layouts.items()})
            parts.update(best_layout=best, he_qk_s=value(layouts[best], "scores_s"), he_pv_s=value(layouts[best], "pv_s"))
        if sm is not None:
            parts["mpc_softmax_s"] = value(sm, "time_s")
        t = value(layouts[best], "time_s") + value(sm, "time_s") if best is not None and sm is not None else None
        goals.append({"goal": f"q.K^T + softmax(s).V, 12 heads, context 512 <= 2 s (HE in the better layout + MPC softmax [{dealer}])",
                      "limit_s": GOALS["attention_ctx512_s"], "measured_s": t, "parts": parts,
                      "verdict": verdict(t, GOALS["attention_ctx512_s"])})
    return goals


def _fmt_s(v):
    return "" if v is None else f"{v:.3f}"


def _fmt_bytes(v):
    if v is None:
        return ""
    return f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{v / 1024:.1f} KiB"


def markdown(rows, goals) -> str:
    out = ["| section | item | shape | time (s, median) | details |", "|---|---|---|---:|---|"]
    for r in rows:
        f = r["figures"]
        t = value(r, "time_s", value(r, "keygen_s"))
        details = []
        if "speedup_vs_one_process" in f:
            details.append(f"shards {', '.join(_fmt_s(x) for x in value(r, 'shard_times_s'))} s; "
                           f"{value(r, 'speedup_vs_one_process'):.2f}x over one process")
        if "scores_s" in f:
            details.append(f"q.K^T {_fmt_s(value(r, 'scores_s'))} s + p.V {_fmt_s(value(r, 'pv_s'))} s")
        if "encode_weights_s" in f:
            details.append(f"encode {_fmt_s(value(r, 'encode_weights_s'))} s")
        if "rounds" in f:
            details.append(f"{value(r, 'rounds')} rounds, {_fmt_bytes(value(r, 'bytes_total'))} (CrypTen)")
        if "channel_bytes" in f:
            details.append(f"channel {value(r, 'channel_messages')} msgs, {_fmt_bytes(value(r, 'channel_bytes'))}")
        for key, label in (("in_bytes", "in"), ("out_bytes", "out"), ("cache_bytes", "cache"), ("bundle_bytes", "bundle")):
            if key in f:
                details.append(f"{label} {_fmt_bytes(value(r, key))}")
        if "max_abs_err" in f:
            unit = f["max_abs_err"]["unit"]
            details.append(f"max err {value(r, 'max_abs_err'):.1e}" + ("" if unit == "abs" else f" ({unit})"))
        if "exact" in f:
            details.append("exact" if value(r, "exact") else "**WRONG RESULT**")
        out.append(f"| {r['section']} | {r['name']} | {r['shape']} | {_fmt_s(t)} | {'; '.join(details)} |")
    out += ["", "| goal | measured (s) | parts | verdict |", "|---|---:|---|---|"]
    for g in goals:
        parts = ", ".join(f"{k}={_fmt_s(v) if isinstance(v, float) else v}" for k, v in g["parts"].items())
        out.append(f"| {g['goal']} | {_fmt_s(g['measured_s'])} | {parts} | **{g['verdict']}** |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a couple of shapes per section (smoke test, < 2 minutes)")
    ap.add_argument("--repeats", type=int, default=3, help="calls per figure; the median is reported (default 3)")
    ap.add_argument("--out", default="results/bench_kernels.json")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--dealers", default="none,ttp", help="MPC dealer modes for the mpc section (none, ttp, client)")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    dealers = [d for d in args.dealers.split(",") if d]
    if set(sections) - set(SECTIONS) or set(dealers) - set(DEALER_MODES):
        ap.error(f"sections must be among {SECTIONS}, dealers among {DEALER_MODES}")
    torch.set_num_threads(1)

    he_c = he_cases(args.quick) if "he" in sections else []
    mpc_c = mpc_cases(args.quick) if "mpc" in sections else []
    conv_n = convert_cases(args.quick) if "convert" in sections else []
    scaling = "scaling" in sections
    total = (len(he_c) + 1 if he_c else 0) + len(mpc_c) * len(dealers) + 2 * len(conv_n) + (len(SCALING_WORKERS) if scaling else 0)
    rows, failures = [], []
    t_start = time.time()
    with tqdm(total=total, unit="item", dynamic_ncols=True, file=sys.stderr) as bar:
        steps = []
        if he_c:
            steps.append(("he", lambda: run_he(he_c, args.repeats, bar)))
        for dealer in dealers if mpc_c else []:
            steps.append((f"mpc[{dealer}]", lambda d=dealer: run_mpc(d, mpc_c, args.repeats, bar)))
        if conv_n:
            steps.append(("convert", lambda: run_convert(conv_n, args.repeats, bar)))
        if scaling:
            steps.append(("scaling", lambda: run_scaling(args.repeats, bar)))
        for label, step in steps:
            try:
                rows += step()
            except Exception as exc:  # noqa: BLE001 (recorded; the other sections still run)
                failures.append({"step": label, "error": f"{type(exc).__name__}: {exc}"})
                tqdm.write(f"FAILED {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
    goals = check_goals(rows)
    report = {
        "benchmark": "scripts/bench_kernels.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick,
        "repeats": args.repeats,
        "statistic": "median of repeats (time.perf_counter); MPC/conversions timed at the server process",
        "threads": "one: torch.set_num_threads(1), OMP_NUM_THREADS=1, SEAL single-threaded; MPC parties 1 torch thread each",
        "machine": machine_info(),
        "total_wall_s": time.time() - t_start,
        "rows": rows,
        "goals": goals,
        "failures": failures,
    }
    if he_c:
        from cryptogen_hf.he import HEParams

        params = HEParams()
        report["he_params"] = {"params": params.to_dict(), "fingerprint": params.fingerprint()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(markdown(rows, goals))
    print(f"\nwrote {args.out} ({report['total_wall_s']:.0f} s){'; FAILURES: ' + str(failures) if failures else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    # launch_local's children import the party programs by module name: run
    # them from the module "bench_kernels", not from this script's __main__.
    import bench_kernels

    sys.exit(bench_kernels.main())
