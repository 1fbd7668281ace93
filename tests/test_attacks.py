"""Each party tries to recover the other's secret from everything it holds.

Both parties run as separate programs in the default mode (``dealer: none``:
two parties, nobody else): ``cryptogen serve`` and a client process, each
under tests/knowledge_recorder.py, which records what that process draws
from its PRG, its share of every correlated tuple, every value opened to it
and every byte it receives. After a short greedy generation on the tiny
GPT-2 of conftest.py:

(a) The client's attack: for every value opened to it and every mask it
    holds (each random tensor it drew, each share of each tuple, and the sum
    of any two members of one tuple), it forms ``opened + mask`` and looks for
    a row that is an affine image of a secret row of block 0 (the residual
    input, the LayerNorm output, the attention and MLP outputs; Pearson
    correlation > 0.99, which is invariant to the fixed-point scale and to
    centring). It must find none. CONTROL: the identical attack on a run with
    ``dealer: client`` (the old mode) finds them.
(b) The server's attack, the same search for the prompt's embedding rows
    ``wte[t] + wpe[i]`` (which name the tokens). CONTROL: the same attack
    given also the client's tuple shares (a broken protocol in which the
    client's masks leak to the server) finds them.
(c) The transcript audit in the client's direction: what the client receives
    holds no block-0 intermediate in any fixed-point encoding (the server's
    direction is audited in tests/test_security.py, in the default mode too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import knowledge_recorder
import transcript_recorder
from conftest import start_server, stop_server
from cryptogen_hf.config import CryptoGenConfig, MPCSettings, TimeoutSettings
from test_security import PROMPT, _find_in_bytes, _first_block_activations, _plain_greedy, _rows

NEW_TOKENS = 2
TIMEOUTS = TimeoutSettings(peer_s=60, startup_s=60, idle_s=300)
DEFAULT = CryptoGenConfig(timeouts=TIMEOUTS)
CLIENT_DEALER = CryptoGenConfig(mpc=MPCSettings(dealer="client", client_sees_activations=True), timeouts=TIMEOUTS)
BLOCK0 = ("h0", "ln1", "attn", "fc_in", "mlp", "h1")
LEAK_CORRELATION = 0.99


def _run(checkpoint, settings, folder: Path) -> dict:
    """A recorded server and a recorded client process; their knowledge and the truth."""
    folder.mkdir(parents=True, exist_ok=True)
    proc, live = start_server(checkpoint, settings, folder / "server.yaml", knowledge_dir=folder)
    try:
        env = {**os.environ, knowledge_recorder.ENV: str(folder)}
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("knowledge_recorder.py")), "client", str(checkpoint),
             live.address, str(folder / "server.yaml"), json.dumps(PROMPT), str(NEW_TOKENS), str(live.cert), str(live.token_file())],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        client = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        stop_server(proc)
    pids = {int(p.stem.split("-")[1]) for p in folder.glob("knowledge-*.pkl")} - {client["pid"]}
    server_pids = [pid for pid in pids if knowledge_recorder.load(folder, pid)["opened"]]
    assert len(server_pids) == 1, pids  # the session worker (the listener holds nothing)
    tokens = client["tokens"]
    return {
        "tokens": tokens,
        "client": knowledge_recorder.load(folder, client["pid"]),
        "server": knowledge_recorder.load(folder, server_pids[0]),
        "client_received": transcript_recorder.load(folder / f"transcript-{client['pid']}.pkl"),
        "truth": _first_block_activations(checkpoint, tokens[:-1]),
    }


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """Both recorded runs at once: each is a server and a client process of
    its own (this process only waits), and a secure step is half waiting for
    the peer, so two runs share the machine well."""
    folders = {name: tmp_path_factory.mktemp(f"attack-{name}") for name in ("default", "client-dealer")}
    with ThreadPoolExecutor(2) as pool:
        default = pool.submit(_run, tiny_checkpoint, DEFAULT, folders["default"])
        client_dealer = pool.submit(_run, tiny_checkpoint, CLIENT_DEALER, folders["client-dealer"])
        return {"default": default.result(), "client dealer": client_dealer.result()}


@pytest.fixture(scope="module")
def default_run(runs):
    return runs["default"]


@pytest.fixture(scope="module")
def client_dealer_run(runs):
    return runs["client dealer"]


# ---------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------
def _masks(knowledge, extra_pairs=()) -> dict:
    """Every value the attacker can subtract from an opening, grouped by size:
    what it drew, its share of each tuple, sums of two members of one tuple,
    and (``extra_pairs``) sums of two arrays it was given besides."""
    groups: dict[int, list] = {}

    def add(a):
        groups.setdefault(a.size, []).append(a.reshape(-1).astype(np.int64))

    for a in knowledge["drawn"]:
        add(a)
    for _, members in knowledge["tuple"]:
        for i, a in enumerate(members):
            add(a)
            for b in members[i + 1 :]:
                if a.size == b.size:
                    add(a.reshape(-1) + b.reshape(-1))
    for a, b in extra_pairs:
        if a.size == b.size:
            add(a.reshape(-1) + b.reshape(-1))
    return groups


def _best_correlation(candidates: np.ndarray, secrets: np.ndarray) -> float:
    """Max |Pearson correlation| of any row of ``candidates`` (k, d) with any secret row (s, d)."""
    def normalise(rows):
        rows = rows - rows.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(rows, axis=1, keepdims=True)
        return np.where(norm > 0, rows / np.where(norm > 0, norm, 1), 0.0)

    return float(np.abs(normalise(candidates) @ normalise(secrets).T).max())


def reconstruct(knowledge, secrets: np.ndarray, extra_pairs=()) -> float:
    """The attacker's best reconstruction: the highest correlation of any
    ``opened +- mask`` (or an opening alone) with a secret row."""
    d = secrets.shape[1]
    groups = _masks(knowledge, extra_pairs)
    best = 0.0
    for opened in knowledge["opened"]:
        e = opened.reshape(-1).astype(np.int64)
        if e.size % d:
            continue
        masks = groups.get(e.size, [])
        stacked = np.stack([e] + [e + m for m in masks] + [e - m for m in masks])  # int64 adds wrap mod 2**64
        rows = (stacked.astype(np.float64) / 2.0**16).reshape(-1, d)
        best = max(best, _best_correlation(rows, secrets))
    return best


def _secret_rows(truth, names) -> np.ndarray:
    return np.concatenate([truth[name].numpy().reshape(-1, truth["h0"].shape[1]) for name in names if truth[name].shape[-1] == truth["h0"].shape[1]])


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_both_runs_generate_the_plaintext_tokens(default_run, client_dealer_run, tiny_checkpoint):
    want = _plain_greedy(tiny_checkpoint, PROMPT, NEW_TOKENS)
    assert default_run["tokens"] == want and client_dealer_run["tokens"] == want
    # The recordings saw the protocol: openings and tuples on both sides.
    for run in (default_run, client_dealer_run):
        for side in ("client", "server"):
            assert len(run[side]["opened"]) > 50 and len(run[side]["drawn"]) > 10


@pytest.mark.timeout(900)
def test_client_cannot_reconstruct_block0_activations(default_run, client_dealer_run):
    secrets = _secret_rows(default_run["truth"], BLOCK0)
    assert reconstruct(default_run["client"], secrets) < 0.9
    # Control: the same attack recovers them exactly when the client deals the triples.
    control = _secret_rows(client_dealer_run["truth"], BLOCK0)
    assert reconstruct(client_dealer_run["client"], control) > LEAK_CORRELATION


@pytest.mark.timeout(900)
def test_server_cannot_reconstruct_the_prompt_embedding_rows(default_run):
    secrets = _secret_rows(default_run["truth"], ("h0",))
    server = default_run["server"]
    assert reconstruct(server, secrets) < 0.9
    # Control: the attack works once the client's masks leak to the server: each tuple's
    # two shares (both parties make the same requests in the same order) add up to the mask.
    client = default_run["client"]
    assert [kind for kind, _ in server["tuple"]] == [kind for kind, _ in client["tuple"]]
    leaked = [(s, c) for (_, ss), (_, cc) in zip(server["tuple"], client["tuple"]) for s, c in zip(ss, cc)]
    assert reconstruct(server, secrets, extra_pairs=leaked) > LEAK_CORRELATION


@pytest.mark.timeout(900)
def test_client_receives_no_block0_activation_in_the_clear(default_run):
    received = b"".join(payload if isinstance(payload, bytes) else payload.tobytes()
                        for source, _, payload in default_run["client_received"])
    truth = default_run["truth"]
    secrets = _rows(truth, ["h0", "ln1", "qkv", "attn", "fc_in", "mlp", "h1"])
    assert len(received) > 100_000 and len(secrets) > 20
    assert _find_in_bytes(received, secrets) == set()
    # The search finds a planted leak (a noisy row at an odd offset).
    leak = secrets[len(secrets) // 2] + np.random.default_rng(0).integers(-8, 9, secrets[0].size)
    planted = bytearray(received[: 2 << 20])
    planted[100_003 : 100_003 + 8 * leak.size] = leak.astype("<i8").tobytes()
    assert len(secrets) // 2 in _find_in_bytes(bytes(planted), secrets)

