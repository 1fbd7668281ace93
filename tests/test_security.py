"""Security and reliability against a real `cryptogen serve` (issue 7).

- Transcript audit: every byte the server's session worker receives (its
  one connection: protocol messages and all of CrypTen's traffic, recorded by
  tests/transcript_recorder.py) is searched for the prompt's token ids, the
  true activations of the first block and the logits, in the fixed-point
  encodings the protocol uses; the secret key never reaches the server; what
  the client decrypts is uniform and uncorrelated with the values behind it.
  Each check is also run on data with a planted leak, to show it can fail.
- Values opened to the client alone never reach the server (the two-party
  communicator's reduce: mpc/channel_comm.py; gloo's reduce did leak them).
- Faults: a client killed mid-generation, corrupted or truncated ciphertexts:
  the session's worker exits, the server keeps serving exact tokens.
- Noise: a server that assumes less noise budget refreshes cache blocks and
  still generates exactly the plaintext tokens.
- Concurrency: 4 client processes at once, one killed, the others exact.

The model is the tiny random GPT-2 of conftest.py; the mode is the default
(two parties, no dealer). tests/test_attacks.py attacks both directions.
"""

import json
import multiprocessing
import os
import signal
import struct
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import transcript_recorder
from conftest import start_server, stop_server
from cryptogen_hf.config import CryptoGenConfig, HESettings, TimeoutSettings
from cryptogen_hf.crypten_compat import import_crypten
from cryptogen_hf.he import ServerHE
from cryptogen_hf.he.keys import _unpack_blobs as unpack_key_bundle
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM
from cryptogen_hf.mpc.runtime import CLIENT, MPCConfig, launch_local, party_channel, rank_of
from cryptogen_hf.protocol import decoder
from cryptogen_hf.protocol.session import server_message_limits
from cryptogen_hf.protocol.transport import PeerReportedError
from cryptogen_hf.protocol.wire import pack_blobs, unpack_blobs
from cryptogen_hf.families import gpt2
from cryptogen_hf.server.weights import normalize

SETTINGS = CryptoGenConfig(timeouts=TimeoutSettings(peer_s=30, startup_s=60, idle_s=300))
# Long enough that the first pass is packed: several tokens per ciphertext in the linear
# layers and its own attention on shares (matmul.ciphertexts); later tokens are decode steps.
PROMPT = [5, 17, 250, 3, 99, 42, 7, 180]
NEW_TOKENS = 3
CTX = multiprocessing.get_context("spawn")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _plain_greedy(checkpoint, prompt, n):
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0].tolist()


def _secure_greedy(checkpoint, live, prompt, n):
    """(tokens, session id, server stats) of a greedy generation by a client in this process."""
    model = CryptoGenForCausalLM.from_pretrained(checkpoint, **live.client_kwargs(), settings=SETTINGS)
    try:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
        return out[0].tolist(), model.session.session_id, model.session.stats()
    finally:
        model.close()


def _workers(server_proc) -> set:
    """Pids of the server's session workers (its child processes)."""
    with open(f"/proc/{server_proc.pid}/task/{server_proc.pid}/children") as f:
        return {int(pid) for pid in f.read().split()}


def _wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def _fixed(x, bits: int) -> np.ndarray:
    return torch.round(torch.as_tensor(x, dtype=torch.float64) * 2.0**bits).to(torch.int64).numpy()


def _find_vectors(haystack: np.ndarray, vectors, modulus=None, rel_tol=0.05, min_frac=0.8):
    """Indices of the ``vectors`` (centred ints) found as a window of ``haystack`` (int64).

    An entry matches within rel_tol x the vector's RMS (plus 16 units: the
    fixed-point error of the protocol); a window matches when min_frac of
    its entries do. Entries are compared mod 2^64 or, with ``modulus``, with
    negatives encoded as modulus - |x| (BFV plaintext slots).
    """
    tols = [int(rel_tol * np.sqrt(np.mean(v.astype(np.float64) ** 2))) + 16 for v in vectors]
    anchors = [int(np.argmax(v)) for v in vectors]  # a positive entry: the same in both encodings
    values = np.array([v[j] for v, j in zip(vectors, anchors)])
    slack = max(tols)
    candidates = np.nonzero((haystack >= values.min() - slack) & (haystack <= values.max() + slack))[0]
    found = set()
    for i, (v, j, tol) in enumerate(zip(vectors, anchors, tols)):
        encoded = v % modulus if modulus else v
        for k in candidates[np.abs(haystack[candidates] - v[j]) <= tol]:
            window = haystack[k - j : k - j + len(v)]
            if k < j or len(window) < len(v):
                continue
            diff = window - encoded
            if modulus:
                diff = (diff + modulus // 2) % modulus - modulus // 2
            if np.mean((diff >= -tol) & (diff <= tol)) >= min_frac:
                found.add(i)
    return found


def _find_in_bytes(data: bytes, vectors, modulus=None) -> set:
    """_find_vectors on the bytes read as little-endian int64 at each of the 8 byte alignments."""
    found = set()
    for a in range(8):
        found |= _find_vectors(np.frombuffer(data, dtype="<i8", offset=a, count=(len(data) - a) // 8), vectors, modulus)
    return found


def _id_encodings(ids) -> list:
    """Byte strings a leaked token-id sequence would show up as."""
    ids = [int(t) for t in ids]
    packed = [struct.pack(f"<{len(ids)}{c}", *ids) for c in "qih"]
    packed.append(struct.pack(f"<{len(ids)}q", *[t << 16 for t in ids]))  # as CrypTen fixed point
    packed.append(json.dumps(ids).encode())
    packed.append(",".join(map(str, ids)).encode())
    return packed


def _uniformity(values_mod_p: np.ndarray, truth: np.ndarray, p: int) -> dict:
    """How far what the client saw is from uniform in Z_p and independent of the truth."""
    u = values_mod_p.astype(np.float64) / p
    n = u.size
    return {
        "corr": abs(np.corrcoef(u, truth.astype(np.float64))[0, 1]),
        "mean": abs(u.mean() - 0.5),
        "var": abs(u.var() - 1 / 12),
        # 5 standard deviations of each statistic for n independent uniform values
        "limits": {"corr": 5 / np.sqrt(n), "mean": 5 * np.sqrt(1 / 12 / n), "var": 5 * np.sqrt((1 / 80 - 1 / 144) / n)},
    }


def _looks_masked(stats: dict) -> bool:
    return all(stats[k] < limit for k, limit in stats["limits"].items())


def _first_block_activations(checkpoint, token_ids) -> dict:
    """The secret values of the protocol for these tokens: rows of the embedding,
    of the intermediates of block 0 (LayerNorm affines folded, as the protocol
    computes them) and the logits, from the plaintext model."""
    plain = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    prep = gpt2.prepare(plain)
    ids = torch.tensor(token_ids)
    block = prep.blocks[0]
    out = {"h0": prep.wte[ids] + prep.wpe[: len(token_ids)], "wte_rows": prep.wte[ids]}
    out["ln1"] = normalize(out["h0"], prep.shape.norm_eps)
    out["ln1_times_w"] = out["ln1"] @ block["qkv"].weight  # what the qkv conversion carries (the bias is the server's addend)
    out["qkv"] = out["ln1_times_w"] + block["qkv"].bias
    layer = plain.transformer.h[0]
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: out.update({name: (o[0] if isinstance(o, tuple) else o)[0]}))
             for name, module in (("attn", layer.attn), ("fc_in", layer.mlp.c_fc), ("mlp", layer.mlp))]
    with torch.no_grad():
        hidden = plain(ids[None], output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    out["h1"], out["logits"] = hidden.hidden_states[1][0], hidden.logits[0]
    return {name: value.double() for name, value in out.items()}


def _rows(values: dict, names, piece: int = 32) -> list:
    """Rows of the named activations, cut into pieces: a leak of part of a row is found too."""
    rows = []
    for name in names:
        for row in values[name]:
            enc = _fixed(row, 16)
            rows += [enc[i : i + piece] for i in range(0, len(enc) - piece + 1, piece)]
    return rows


# ---------------------------------------------------------------------------
# transcript audit
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recording_server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("transcripts")
    proc, live = start_server(tiny_checkpoint, SETTINGS, folder / "server.yaml", transcript_dir=folder)
    yield proc, live, folder
    stop_server(proc)


@pytest.fixture(scope="module")
def audited(recording_server, tiny_checkpoint):
    """One secure generation; what the server received, what the client decrypted, the truth."""
    proc, live, folder = recording_server
    before = set(folder.glob("transcript-*.pkl"))
    client_view = []  # (frac_bits, values) of every HE -> shares conversion, as the client decrypted them
    original = decoder.he_to_shares

    def recording_he_to_shares(party, ciphertexts, layout, frac_bits, n, server_addend=None):
        unpack = layout.unpack_output

        def record(slots):
            values = unpack(slots)
            client_view.append((frac_bits, np.asarray(values, dtype=np.uint64).reshape(-1).copy()))
            return values

        layout.unpack_output = record
        return original(party, ciphertexts, layout, frac_bits, n, server_addend)

    decoder.he_to_shares = recording_he_to_shares
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, **live.client_kwargs(), settings=SETTINGS)
    try:
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        he, session_id, stats = model.session.he, model.session.session_id, model.session.stats()
    finally:
        decoder.he_to_shares = original
        model.close()
    # The session worker's (the accepting process records only the token check, in its own file).
    (transcript,) = set(folder.glob("transcript-*.pkl")) - before - {folder / f"transcript-{proc.pid}.pkl"}
    records = transcript_recorder.load(transcript)
    processed = tokens[:-1]  # the last token is generated, never fed back
    return {
        "tokens": tokens,
        "session_id": session_id,
        "stats": stats,
        "he": he,
        "channel": [(kind, payload) for source, kind, payload in records if source == "channel"],
        "mpc": [array for source, _, array in records if source == "mpc"],
        "client_view": client_view,
        "truth": _first_block_activations(tiny_checkpoint, processed),
        "processed": processed,
    }


@pytest.mark.timeout(240)
def test_generation_under_audit_is_exact_and_session_id_is_128_bit(audited, tiny_checkpoint):
    assert audited["tokens"] == _plain_greedy(tiny_checkpoint, PROMPT, NEW_TOKENS)
    assert audited["stats"]["refreshed_blocks"] == 0  # default noise policy: nothing to refresh this early
    sid = audited["session_id"]
    assert len(sid) == 32 and int(sid, 16) >= 0  # secrets.token_hex(16): 128 bits
    assert len(audited["mpc"]) > 100 and sum(a.nbytes for a in audited["mpc"]) > 100_000  # MPC traffic was recorded


@pytest.mark.timeout(240)
def test_server_receives_no_token_ids_and_no_activations_in_the_clear(audited):
    channel, p = audited["channel"], audited["he"].p
    # Every kind of message the server receives, and the JSON ones carry no token ids.
    kinds = {kind for kind, _ in channel}
    assert kinds == {"hello", "he_bundle", "request", "embed.onehot", "to_he.ciphertexts", "matmul.ciphertexts"}, kinds
    for kind, payload in channel:
        if kind == "request":
            assert set(json.loads(payload)) <= {"op", "logits_for", "length", "packed"}, payload
    # Every ciphertext the client sent is a valid 2-component BFV ciphertext for the session's keys.
    server_he = ServerHE.from_bundle(next(payload for kind, payload in channel if kind == "he_bundle"))
    for kind, payload in channel:
        if kind in ("embed.onehot", "to_he.ciphertexts", "matmul.ciphertexts"):
            assert all(server_he.load_ct(blob).size() == 2 for blob in unpack_blobs(payload))

    received = b"".join(payload for _, payload in channel) + b"".join(a.tobytes() for a in audited["mpc"])
    id_patterns = _id_encodings(PROMPT)
    assert not [pat for pat in id_patterns if pat in received]
    truth = audited["truth"]
    secrets_16 = _rows(truth, ["h0", "ln1", "qkv", "attn", "fc_in", "mlp", "h1", "logits"])
    secrets_12 = [_fixed(row, 12) for name in ("h0", "ln1", "attn", "h1") for row in truth[name]]  # as HE slots
    assert len(secrets_16) > 60
    searches = [(secrets_16, None), (secrets_12, None), (secrets_12, p)]
    for vectors, modulus in searches:
        assert _find_in_bytes(received, vectors, modulus) == set()

    # The same search finds a leak: plant a noisy half row of each kind at odd offsets.
    planted = bytearray(received[: 4 << 20])
    rng = np.random.default_rng(0)
    for i, (vectors, modulus) in enumerate(searches):
        leak = vectors[len(vectors) // 2]
        noisy = leak + rng.integers(-8, 9, leak.size)
        noisy = noisy % modulus if modulus else noisy
        at = 1_000_003 + i * 100_001
        planted[at : at + 8 * leak.size] = noisy.astype("<i8").tobytes()
        assert len(vectors) // 2 in _find_in_bytes(bytes(planted), vectors, modulus)


@pytest.mark.timeout(240)
def test_server_never_receives_the_secret_key(audited):
    channel, he = audited["channel"], audited["he"]
    bundle = next(payload for kind, payload in channel if kind == "he_bundle")
    server_he = ServerHE.from_bundle(bundle)  # exactly what the server's worker built
    assert not any(type(v).__name__ in ("SecretKey", "Decryptor", "KeyGenerator") for v in vars(server_he).values())
    # The key as SEAL serializes it, and its raw coefficients, appear nowhere in what the server received.
    sk_bytes = he.secret_key_bytes()
    sk_data = he._secret_key.data()
    raw = np.array([sk_data[i] for i in range(0, 4096)], dtype="<u8").tobytes()
    needles = [sk_bytes[i : i + 64] for i in range(16, len(sk_bytes) - 64, len(sk_bytes) // 16)]
    needles += [raw[i : i + 64] for i in range(0, len(raw), 4096)]
    received = b"".join(payload for _, payload in channel)
    assert not [n for n in needles if n in received]
    assert all(n in received[: 1 << 20] + sk_bytes + raw for n in needles)  # ... and would be found if it were there
    # The bundle holds its documented header and three keys: public, relinearization, Galois.
    header, blobs = unpack_key_bundle(bundle)
    assert set(header) == {"params", "fingerprint", "galois_steps", "noise_model"} and len(blobs) == 3


@pytest.mark.timeout(240)
def test_client_sees_only_uniformly_masked_values(audited):
    """The HE -> shares conversions open y + r (r uniform in Z_p) to the client: check on the
    embedding and first qkv conversions of every pass, whose true y the plaintext model gives."""
    he, truth, view = audited["he"], audited["truth"], audited["client_view"]
    fp = SETTINGS.fixed_point
    embed = [v for bits, v in view if bits == fp.weight_bits]
    qkv = [view[i + 1][1] for i, (bits, _) in enumerate(view) if bits == fp.weight_bits]
    assert len(embed) == NEW_TOKENS  # one embedding conversion per pass
    seen = np.concatenate(embed + qkv)
    y = np.concatenate([_fixed(truth["wte_rows"], fp.weight_bits).reshape(-1),
                        _fixed(truth["ln1_times_w"], fp.activation_bits + fp.weight_bits).reshape(-1)])
    assert seen.size == y.size == len(audited["processed"]) * 4 * 64
    stats = _uniformity(seen, y, he.p)
    assert _looks_masked(stats), stats
    # The unmasked values (y + H mod p, what the client would see without r) fail every check.
    unmasked = _uniformity((y + he.p // 2) % he.p, y, he.p)
    assert unmasked["corr"] > 0.99 and unmasked["var"] > 5 * unmasked["limits"]["var"]
    assert not _looks_masked(unmasked)


# ---------------------------------------------------------------------------
# values opened to the client never reach the server
# ---------------------------------------------------------------------------
def _reveal_to_client(role, folder):
    """Open values to the client with CrypTen's reveal(dst), then once, as a control, to both parties."""
    import_crypten()
    import crypten.communicator as comm
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

    transcript_recorder.install(Path(folder) / role, channels=[party_channel()])
    secrets = torch.randint(-(2**62), 2**62, (3, 1000), generator=torch.Generator().manual_seed(3))
    client = rank_of(CLIENT)

    def shared(v, binary=False):
        mine = v if role == "client" else torch.zeros_like(v)
        return BinarySharedTensor(mine, src=client) if binary else ArithmeticSharedTensor(mine, precision=0, src=client)

    opened = [
        shared(secrets[0]).reveal(dst=client),  # logits-like: a long vector
        shared(secrets[1][:1]).reveal(dst=client),  # token-like: one value
        shared(secrets[1][1:100], binary=True).reveal(dst=client),  # binary shares (XOR)
    ]
    # Control, a broken variant: opening with all_reduce hands the server the client's share too.
    opened.append(comm.get().all_reduce(shared(secrets[2]).share.clone()))
    return [None if t is None else t.clone() for t in opened], secrets


@pytest.mark.timeout(120)
def test_values_opened_to_the_client_never_reach_the_server(tmp_path):
    results = launch_local(_reveal_to_client, MPCConfig(dealer="none", timeout_s=60), args=(str(tmp_path),), wall_timeout_s=100)
    opened, secrets = results["client"]
    assert torch.equal(opened[0], secrets[0]) and torch.equal(opened[1], secrets[1][:1])
    assert torch.equal(opened[2], secrets[1][1:100]) and torch.equal(opened[3], secrets[2])
    assert all(t is None for t in results["server"][0][:3])
    received = np.concatenate([a.reshape(-1) for f in (tmp_path / "server").glob("*.pkl")
                               for source, _, a in transcript_recorder.load(f) if source == "mpc" and a.dtype == np.int64])
    assert np.isin(secrets[0].numpy(), received).sum() == 0
    assert np.isin(secrets[1].numpy(), received).sum() == 0
    # The control: opened to both, the server holds every value.
    assert torch.equal(results["server"][0][3], secrets[2])


# ---------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------
def _client_process(checkpoint, live, prompt, n_new, queue):
    """A client in its own process: reports ("open", pid, session id), then ("done", pid, tokens)."""
    try:
        torch.set_num_threads(1)
        model = CryptoGenForCausalLM.from_pretrained(checkpoint, **live.client_kwargs(), settings=SETTINGS)
        queue.put(("open", os.getpid(), model.session.session_id))
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)
        queue.put(("done", os.getpid(), out[0].tolist()))
        model.close()
    except BaseException:  # noqa: BLE001 (reported to the test)
        queue.put(("error", os.getpid(), traceback.format_exc()))


def _start_clients(checkpoint, live, jobs):
    queue = CTX.Queue()
    procs = [CTX.Process(target=_client_process, args=(str(checkpoint), live, prompt, n, queue), daemon=True)
             for prompt, n in jobs]
    for proc in procs:
        proc.start()
    return procs, queue


def _next_message(queue, timeout_s):
    message = queue.get(timeout=timeout_s)
    assert message[0] != "error", message[2]
    return message


@pytest.mark.timeout(240)
def test_client_killed_mid_generation_ends_its_worker_and_server_keeps_serving(recording_server, tiny_checkpoint):
    proc, live, _ = recording_server
    _wait_until(lambda: not _workers(proc), 30, "earlier sessions' workers exited")
    (client,), queue = _start_clients(tiny_checkpoint, live, [(PROMPT, 40)])
    try:
        _next_message(queue, 120)
        (worker,) = _workers(proc)
        time.sleep(3)  # well into the generation
        os.kill(client.pid, signal.SIGKILL)
    finally:
        client.join(timeout=10)
    _wait_until(lambda: not os.path.exists(f"/proc/{worker}"), 30, f"session worker {worker} exited and was reaped")
    assert proc.poll() is None
    tokens, _, _ = _secure_greedy(tiny_checkpoint, live, PROMPT, NEW_TOKENS)
    assert tokens == _plain_greedy(tiny_checkpoint, PROMPT, NEW_TOKENS)


def _real_onehots(session):
    plans, he = session.plans, session.he
    onehot = np.zeros(plans.embed_chunks * plans.embed_chunk, dtype=np.int64)
    onehot[PROMPT[0]] = 1
    return [he.encrypt_serialized(plans.embed.pack_input(c)) for c in onehot.reshape(plans.embed_chunks, -1)]


def _damaged(blob: bytes, how: str) -> bytes:
    if how == "truncated":
        return blob[: len(blob) // 2]
    middle = len(blob) // 2
    return blob[:middle] + os.urandom(64) + blob[middle + 64 :]


def _bad_embedding_payloads(session):
    """(payload sent in place of the client's encrypted one-hot, the server's expected error)."""
    blobs = _real_onehots(session)
    n = len(blobs)
    return [
        (os.urandom(5000), "truncated (or corrupted )?ciphertext list"),
        (pack_blobs([_damaged(blobs[0], "truncated")] + blobs[1:]), "CiphertextError: corrupted or truncated ciphertext"),
        (pack_blobs([_damaged(blobs[0], "overwritten")] + blobs[1:]), "CiphertextError: (corrupted or truncated|ciphertext is not valid)"),
        (pack_blobs(blobs + blobs), f"client sent {2 * n} embedding ciphertexts, expected {n}"),
    ]


@pytest.mark.timeout(240)
def test_corrupted_ciphertexts_get_a_clear_error_and_server_keeps_serving(recording_server, tiny_checkpoint):
    proc, live, _ = recording_server
    for case in range(4):
        session = live.session(SETTINGS)
        try:
            payload, message = _bad_embedding_payloads(session)[case]
            session._request(op="forward", logits_for=[True])
            session.channel.send("embed.onehot", payload)
            with pytest.raises(PeerReportedError, match=message):
                session.channel.recv("from_he.ciphertexts", timeout_s=60)
        finally:
            session.close()
    # A frame cut short by a client that then vanishes: the worker gives up at once.
    session = live.session(SETTINGS)
    session._request(op="forward", logits_for=[True])
    header = b"CGv1" + struct.pack("<H", 12) + b"embed.onehot" + struct.pack("<Q", 1 << 20)  # announces 1 MiB
    session.channel.sock.sendall(header + b"\x00" * 1000)
    session.close()
    # A frame longer than the plan allows for its kind: refused from its header, with an error.
    session = live.session(SETTINGS)
    try:
        limit = server_message_limits(session.plans, session.shape, session.he.params)["embed.onehot"]
        session._request(op="forward", logits_for=[True])
        session.channel.sock.sendall(b"CGv1" + struct.pack("<H", 12) + b"embed.onehot" + struct.pack("<Q", limit + 1))
        with pytest.raises(PeerReportedError, match=f"announced a {limit + 1}-byte 'embed.onehot' message \\(limit {limit}\\)"):
            session.channel.recv("from_he.ciphertexts", timeout_s=60)
    finally:
        session.close()
    _wait_until(lambda: not _workers(proc), 30, "every bad session's worker exited")
    assert proc.poll() is None
    tokens, _, _ = _secure_greedy(tiny_checkpoint, live, PROMPT, NEW_TOKENS)
    assert tokens == _plain_greedy(tiny_checkpoint, PROMPT, NEW_TOKENS)


# ---------------------------------------------------------------------------
# noise refresh
# ---------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_exhausted_noise_budget_is_refreshed_and_tokens_stay_exact(tiny_checkpoint, tmp_path):
    # The server assumes 1000 bits less fresh budget than the client measured:
    # every cache block looks exhausted before every decode pass.
    settings = CryptoGenConfig(he=HESettings(noise_reserve_bits=1000), mpc=SETTINGS.mpc, timeouts=SETTINGS.timeouts)
    proc, live = start_server(tiny_checkpoint, settings, tmp_path / "server.yaml", transcript_dir=tmp_path)
    try:
        tokens, _, stats = _secure_greedy(tiny_checkpoint, live, PROMPT, NEW_TOKENS)
    finally:
        stop_server(proc)
    assert tokens == _plain_greedy(tiny_checkpoint, PROMPT, NEW_TOKENS)
    decode_passes = NEW_TOKENS - 1
    n_layer = GPT2Config.from_pretrained(tiny_checkpoint).n_layer
    assert stats["refreshed_blocks"] == decode_passes * n_layer  # one block per layer, each decode pass
    (transcript,) = set(tmp_path.glob("transcript-*.pkl")) - {tmp_path / f"transcript-{proc.pid}.pkl"}  # the worker's
    fresh = [payload for source, kind, payload in transcript_recorder.load(transcript) if kind == "refresh.fresh"]
    assert len(fresh) == decode_passes and all(len(unpack_blobs(f)) == 2 * n_layer for f in fresh)  # K and V


# ---------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_four_concurrent_clients_one_killed(recording_server, tiny_checkpoint):
    proc, live, folder = recording_server
    _wait_until(lambda: not _workers(proc), 30, "earlier sessions' workers exited")
    before = set(folder.glob("transcript-*.pkl"))
    prompts = [[5, 17, 250], [101, 7], [42, 42, 3, 199], [260, 11, 12]]
    jobs = [(prompt, NEW_TOKENS) for prompt in prompts[:3]] + [(prompts[3], 40)]  # the last one is killed
    procs, queue = _start_clients(tiny_checkpoint, live, jobs)
    victim = procs[3]
    sessions, results = {}, {}
    try:
        while len(results) < 3 or victim.pid not in sessions:
            kind, pid, value = _next_message(queue, 200)
            if kind == "open":
                sessions[pid] = value
                if pid == victim.pid:
                    time.sleep(2)
                    os.kill(victim.pid, signal.SIGKILL)
                    finished_before_the_kill = len(results)
            else:
                results[pid] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert victim.pid in sessions and victim.pid not in results
    assert finished_before_the_kill < 3  # the others were still generating when it died
    for p, prompt in zip(procs[:3], prompts[:3]):
        assert results[p.pid] == _plain_greedy(tiny_checkpoint, prompt, NEW_TOKENS), prompt
    # Session ids: distinct 128-bit values with no visible relation (pairwise ~64 differing bits).
    ids = [int(sessions[p.pid], 16) for p in procs]
    assert all(len(sessions[p.pid]) == 32 for p in procs) and len(set(ids)) == 4
    assert min(bin(a ^ b).count("1") for i, a in enumerate(ids) for b in ids[i + 1 :]) > 30
    # Each session had its own keys: four different key bundles reached the server.
    bundles = set()
    for path in set(folder.glob("transcript-*.pkl")) - before:
        bundles |= {hash(payload) for _, kind, payload in transcript_recorder.load(path) if kind == "he_bundle"}
    assert len(bundles) == 4
    _wait_until(lambda: not _workers(proc), 30, "all four workers exited")
    assert proc.poll() is None
