"""Sessions against a real `cryptogen serve` process: handshake, the default two-party mode, faults."""

import json
import os
import signal
import socket
import threading
import time

import psutil
import pytest
import torch
from conftest import start_server, stop_server
from transformers import GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from cryptogen_hf.config import CryptoGenConfig, FixedPointSettings, HESettings, MPCSettings, ServerSettings, TimeoutSettings
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM, EncryptedCache
from cryptogen_hf.mpc.runtime import PeerError
from cryptogen_hf.protocol.session import ClientSession, HandshakeError
from cryptogen_hf.protocol import credentials, transport
from cryptogen_hf.protocol.transport import PeerReportedError, TransportError
from cryptogen_hf.families import UnsupportedArchitectureError



@pytest.fixture(scope="module")
def shared_server(tiny_checkpoint):
    """One server for the tests that leave it running, each with sessions of
    its own (a server per test costs ~8 s of start-up); the tests that kill
    it or count its worker processes start their own (``server``)."""
    proc, live = start_server(tiny_checkpoint)
    yield proc, live
    stop_server(proc)

def test_mismatched_settings_are_refused_at_the_handshake_and_server_survives(shared_server, tiny_checkpoint):
    proc, live = shared_server
    with pytest.raises(HandshakeError, match="fixed-point settings mismatch"):
        live.session(CryptoGenConfig(fixed_point=FixedPointSettings(activation_bits=10)))
    with pytest.raises(HandshakeError, match="HE parameters mismatch"):
        live.session(CryptoGenConfig(he=HESettings(plain_modulus_bits=40)))
    with pytest.raises(HandshakeError, match="HE parameters mismatch"):
        live.session(CryptoGenConfig(he=HESettings(coeff_modulus_bits=[43, 43, 44, 44, 44])))
    assert proc.poll() is None  # still serving
    # A matching client (default settings: two parties, no dealer) gets exact greedy tokens.
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, **live.client_kwargs())
    try:
        ids = torch.tensor([[5, 17, 250]])
        secure = model.generate(ids, max_new_tokens=3, do_sample=False)
        plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval().generate(ids, max_new_tokens=3, do_sample=False)
        assert secure.tolist() == plain.tolist()
    finally:
        model.close()


def test_cropped_cache_continues_like_the_cropped_text_with_prepared_correlations(shared_server, tiny_checkpoint):
    _, live = shared_server
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, **live.client_kwargs())
    plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    try:
        assert model.prepare_correlations(2) is False  # no decode token yet to size them from
        with pytest.raises(ValueError, match="prepare's token count is 0"):
            model.prepare_correlations(0)
        cache = EncryptedCache(model)
        out = model.generate(torch.tensor([[11, 12, 13]]), cache=cache, max_new_tokens=5, do_sample=False)
        assert cache.get_seq_length() == 7
        cache.crop(-3)  # keep 4 tokens: the last kept cache block is re-encrypted with slots zeroed
        assert cache.get_seq_length() == 4 and model.session.stats()["tokens"] == 4
        assert model.session.stats()["refreshed_blocks"] == model.config.n_layer
        # Made while "idle", the correlations of 20 tokens (more than the
        # pools hold, so new batches are made now): the next 3
        # one-token passes then make none (the offline clock stands still).
        before = model.session.correlation_stats()["seconds"]
        assert model.prepare_correlations(20) is True
        offline_s = model.session.correlation_stats()["seconds"]
        assert offline_s > before
        kept = torch.cat([out[:, :4], torch.tensor([[42]])], dim=1)
        continued = model.generate(kept, cache=cache, max_new_tokens=3, do_sample=False)
        assert continued.tolist() == plain.generate(kept, max_new_tokens=3, do_sample=False).tolist()
        assert model.session.correlation_stats()["seconds"] == offline_s
    finally:
        model.close()


def test_bad_requests_are_refused_and_the_session_goes_on(shared_server, tiny_checkpoint):
    """A zero-token pass is refused on the client before anything is sent;
    malformed requests get an error from the server, which keeps serving the
    session; benchmark and diagnostic operations are off unless the server
    was started with --diagnostics; the handshake names no checkpoint."""
    _, live = shared_server
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, **live.client_kwargs())
    plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    try:
        session = model.session
        assert session.shape.name == ""  # shapes only: no directory name, no weights hash
        with pytest.raises(RuntimeError, match="--diagnostics"):
            session.fill_for_benchmark(3)
        assert "timings" not in session.stats() and "peak_rss_mb" not in session.stats()
        cache = EncryptedCache(model)
        out = model.generate(torch.tensor([[5, 17, 250]]), cache=cache, max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="no new tokens to run"):
            model.generate(out[:, :3], cache=cache, max_new_tokens=1, do_sample=False)
        bad = ({"op": "fly"}, {"op": "forward", "logits_for": []}, {"op": "forward", "logits_for": [True], "packed": "yes"},
               {"op": "crop", "length": 99}, [1, 2])
        for request in bad:
            session.channel.send("request", json.dumps(request).encode())
            with pytest.raises(PeerReportedError, match="bad request"):
                session.channel.recv_payload("reply")
        more = model.generate(out, cache=cache, max_new_tokens=2, do_sample=False)
        assert more.tolist() == plain.generate(out, max_new_tokens=2, do_sample=False).tolist()
    finally:
        model.close()


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def _knock(live, token: str) -> str:
    """Connect over TLS (checking the server's certificate), present ``token``,
    and return the server's answer: "auth.ok" or its refusal."""
    channel = transport.connect("127.0.0.1", live.port, "server", timeout_s=10, tls=credentials.client_tls_context(str(live.cert)))
    try:
        channel.send("auth", json.dumps({"token": token}).encode())
        try:
            return channel.recv("auth.ok")[0]
        except PeerReportedError as refused:
            return refused.peer_message
    finally:
        channel.close()


def _listening_ports(pid: int, descendants: bool = True) -> set:
    """TCP ports the process (and its descendants) listen on."""
    procs = [psutil.Process(pid)] + (psutil.Process(pid).children(recursive=True) if descendants else [])
    return {c.laddr.port for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_only_clients_with_a_valid_token_get_a_worker_and_one_port_carries_everything(tiny_checkpoint):
    limits = ServerSettings(max_sessions_per_client=1)
    proc, live = start_server(tiny_checkpoint, settings=CryptoGenConfig(server=limits))
    try:
        # Refused in the accepting process: no worker exists for any of these.
        assert _knock(live, "x" * 43) == "authentication failed: this server does not know that token"
        assert _knock(live, live.tokens["alice"][:-1]) == "authentication failed: this server does not know that token"
        with pytest.raises(HandshakeError, match="does not know that token"):
            ClientSession("127.0.0.1", live.port, server_cert=str(live.cert), token="y" * 43)
        with pytest.raises(credentials.CredentialsError, match="token is needed"):
            ClientSession("127.0.0.1", live.port, server_cert=str(live.cert))
        plain = socket.create_connection(("127.0.0.1", live.port))  # no TLS: the handshake fails, nothing is read
        plain.sendall(b"CGv1" + b"\x05\x00hello" + b"\x00" * 8)
        plain.settimeout(15)
        try:
            answer = plain.recv(100)
        except ConnectionResetError:
            answer = b""
        plain.close()
        assert answer == b"" or answer[:1] == b"\x15"  # closed or reset, at most after a TLS alert record; never a reply
        assert _children(proc.pid) == []

        first = live.session()
        try:
            assert len(_children(proc.pid)) == 1  # the first session's worker
            # During a session the server (accepting process and worker) and the
            # client listen on the announced port only: CrypTen runs on the session's connection.
            assert _listening_ports(proc.pid) == {live.port}
            assert _listening_ports(os.getpid(), descendants=False) == set()  # this process is the client
            assert _knock(live, live.tokens["alice"]).startswith("too many sessions for client 'alice': 1 running (limit 1)")
            assert len(_children(proc.pid)) == 1  # no worker was started for it
            assert _knock(live, live.tokens["bob"]) == "auth.ok"  # another client is not held to alice's limit
            logits = first.forward([5, 6], [False, True])  # the running session is untouched
            assert logits.shape == (1, 300) and torch.isfinite(torch.as_tensor(logits)).all()
        finally:
            first.close()
    finally:
        stop_server(proc)


def test_server_busy_refuses_before_starting_a_worker(tiny_checkpoint):
    proc, live = start_server(tiny_checkpoint, settings=CryptoGenConfig(server=ServerSettings(max_concurrent_sessions=1)))
    try:
        first = live.session()
        try:
            assert _knock(live, live.tokens["bob"]).startswith("server busy: 1 sessions running (limit 1)")
            assert len(_children(proc.pid)) == 1
            assert first.forward([5], [True]).shape == (1, 300)
        finally:
            first.close()
    finally:
        stop_server(proc)


def test_a_server_with_another_certificate_is_refused_by_the_client(server, tmp_path):
    proc, live = server
    impostor, _ = credentials.self_signed_certificate(["127.0.0.1", "localhost"])  # same names, another key
    elsewhere, _ = credentials.self_signed_certificate(["other.example"])
    (tmp_path / "elsewhere.pem").write_bytes(elsewhere)
    for pinned in (impostor, str(tmp_path / "elsewhere.pem"), None):  # None: the system's CAs
        with pytest.raises(transport.CertificateError, match="does not verify"):
            ClientSession("127.0.0.1", live.port, server_cert=pinned, token=live.tokens["alice"])
    with pytest.raises(credentials.CredentialsError, match="not found"):
        ClientSession("127.0.0.1", live.port, server_cert=str(tmp_path / "absent.pem"), token=live.tokens["alice"])
    assert _children(proc.pid) == []  # the client never sent its token


def test_token_only_reveal_gives_greedy_tokens(shared_server, tiny_checkpoint):
    _, live = shared_server
    settings = CryptoGenConfig(mpc=MPCSettings(reveal="token"))
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, **live.client_kwargs(), settings=settings)
    try:
        ids = torch.tensor([[7, 8, 9]])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval().generate(ids, max_new_tokens=3, do_sample=False)
        assert out.sequences.tolist() == plain.tolist()
        # The client saw one finite entry per step: the token, no logits.
        assert all(int(torch.isfinite(step).sum()) == 1 for step in out.logits)
        # Sampled inside MPC: again one token per step and nothing else.
        drawn = model.generate(ids, max_new_tokens=2, do_sample=True, top_k=0, temperature=1.5,
                               output_logits=True, return_dict_in_generate=True)
        assert drawn.sequences.shape == (1, 5) and int(drawn.sequences.max()) < 300
        assert all(int(torch.isfinite(step).sum()) == 1 for step in drawn.logits)
        assert [int(step.argmax()) for step in drawn.logits] == drawn.sequences[0, 3:].tolist()
    finally:
        model.close()


def test_unsupported_architecture_is_refused_before_starting_a_server(tmp_path):
    OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=32,
                             vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="model_type='opt'"):
        CryptoGenForCausalLM.from_pretrained(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CryptoGenForCausalLM.from_pretrained(tmp_path / "absent")


def test_server_killed_mid_generation_raises_within_the_timeout(server, tiny_checkpoint):
    proc, live = server
    settings = CryptoGenConfig(timeouts=TimeoutSettings(peer_s=15))
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, **live.client_kwargs(), settings=settings)
    killer = threading.Timer(4.0, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises((PeerError, TransportError, RuntimeError)) as info:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=40, do_sample=False)
        assert time.monotonic() - start < 4.0 + 15 + 10
        assert "server" in str(info.value)
    finally:
        killer.cancel()
        model.close()


def test_concurrent_sessions_are_bounded_by_memory(tiny_checkpoint):
    from cryptogen_hf.server.serve import (HELPER_BASE_BYTES, WORKER_BASE_BYTES, concurrent_session_limit, load_hosted_model,
                                           session_memory_estimate)

    hosted = load_hosted_model(tiny_checkpoint, CryptoGenConfig(), progress=False)
    per_session = session_memory_estimate(hosted)
    # keys and a full cache of the 2-layer model come on top of the working allowance
    assert WORKER_BASE_BYTES + (1 << 20) < per_session < WORKER_BASE_BYTES + (1 << 30)
    # Each HE helper adds its own allowance and a copy of its share of the cache.
    assert session_memory_estimate(hosted, he_workers=3) - per_session > 2 * HELPER_BASE_BYTES + (1 << 20)
    assert concurrent_session_limit(4, per_session, None) == 4  # nothing known: the configured limit
    assert concurrent_session_limit(4, per_session, 100 * per_session) == 4
    assert concurrent_session_limit(4, per_session, 2 * per_session + 1) == 2
    assert concurrent_session_limit(4, per_session, per_session // 2) == 1  # always one


def test_two_secure_models_in_one_process_take_turns(shared_server, tiny_checkpoint):
    _, live = shared_server
    plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    first = CryptoGenForCausalLM.from_pretrained(**live.client_kwargs())
    try:
        second = CryptoGenForCausalLM.from_pretrained(**live.client_kwargs())
        try:
            assert first.session.session_id != second.session.session_id
            a, b = torch.tensor([[5, 17, 250]]), torch.tensor([[9, 8]])
            cache_a, cache_b = EncryptedCache(first), EncryptedCache(second)
            out_a = first.generate(a, cache=cache_a, max_new_tokens=2, do_sample=False)
            out_b = second.generate(b, cache=cache_b, max_new_tokens=2, do_sample=False)
            # Each continues its own conversation after the other ran.
            out_a = first.generate(out_a, cache=cache_a, max_new_tokens=1, do_sample=False)
            assert out_a.tolist() == plain.generate(a, max_new_tokens=3, do_sample=False).tolist()
            assert out_b.tolist() == plain.generate(b, max_new_tokens=2, do_sample=False).tolist()
        finally:
            second.close()
        # The first model's session is untouched by the second one's end.
        again = first.generate(out_a, cache=cache_a, max_new_tokens=1, do_sample=False)
        assert again.tolist() == plain.generate(a, max_new_tokens=4, do_sample=False).tolist()
    finally:
        first.close()
