"""Sessions against a real `cryptogen serve` process: handshake, the default two-party mode, faults."""

import json
import os
import signal
import socket
import threading
import time

import pytest
import torch
from conftest import start_server, stop_server
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cryptogen_hf.config import CryptoGenConfig, FixedPointSettings, HESettings, MPCSettings, ServerSettings, TimeoutSettings
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM, EncryptedCache
from cryptogen_hf.mpc.runtime import PeerError
from cryptogen_hf.protocol.session import ClientSession, HandshakeError
from cryptogen_hf.protocol import transport
from cryptogen_hf.protocol.transport import PeerReportedError, TransportError
from cryptogen_hf.server.weights import UnsupportedArchitectureError


def test_mismatched_settings_are_refused_at_the_handshake_and_server_survives(server, tiny_checkpoint):
    proc, port = server
    with pytest.raises(HandshakeError, match="fixed-point settings mismatch"):
        ClientSession("127.0.0.1", port, CryptoGenConfig(fixed_point=FixedPointSettings(activation_bits=10)))
    with pytest.raises(HandshakeError, match="HE parameters mismatch"):
        ClientSession("127.0.0.1", port, CryptoGenConfig(he=HESettings(plain_modulus_bits=40)))
    with pytest.raises(HandshakeError, match="HE parameters mismatch"):
        ClientSession("127.0.0.1", port, CryptoGenConfig(he=HESettings(coeff_modulus_bits=[43, 43, 44, 44, 44])))
    assert proc.poll() is None  # still serving
    # A matching client (default settings: two parties, no dealer) gets exact greedy tokens.
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, server=f"127.0.0.1:{port}")
    try:
        ids = torch.tensor([[5, 17, 250]])
        secure = model.generate(ids, max_new_tokens=3, do_sample=False)
        plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval().generate(ids, max_new_tokens=3, do_sample=False)
        assert secure.tolist() == plain.tolist()
    finally:
        model.close()


def test_cropped_cache_continues_like_the_cropped_text_with_prepared_correlations(server, tiny_checkpoint):
    _, port = server
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, server=f"127.0.0.1:{port}")
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


def test_bad_requests_are_refused_and_the_session_goes_on(server, tiny_checkpoint):
    """A zero-token pass is refused on the client before anything is sent;
    malformed requests get an error from the server, which keeps serving the
    session; benchmark and diagnostic operations are off unless the server
    was started with --diagnostics; the handshake names no checkpoint."""
    _, port = server
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, server=f"127.0.0.1:{port}")
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
        for request in ({"op": "fly"}, {"op": "forward", "logits_for": []}, {"op": "crop", "length": 99}, [1, 2]):
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


def _knock(port: int, source: str = "127.0.0.1") -> str:
    """Connect from `source`, say hello, and return the server's refusal."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    channel = transport.Channel(sock, "server", timeout_s=10)
    try:
        channel.send("hello", b"{}")
        with pytest.raises(PeerReportedError) as refused:
            channel.recv_payload("welcome")
        return refused.value.peer_message
    finally:
        channel.close()


@pytest.mark.parametrize("limits, refusal", [
    (ServerSettings(max_concurrent_sessions=1), "server busy: 1 sessions running (limit 1)"),
    (ServerSettings(max_sessions_per_client=1), "too many sessions from 127.0.0.1: 1 running (limit 1)"),
])
def test_server_limits_refuse_a_client_before_starting_a_worker(tiny_checkpoint, tmp_path, limits, refusal):
    proc, port = start_server(tiny_checkpoint, settings=CryptoGenConfig(server=limits), settings_path=tmp_path / "server.yaml")
    try:
        first = ClientSession("127.0.0.1", port)
        try:
            assert len(_children(proc.pid)) == 1  # the first session's worker
            assert _knock(port).startswith(refusal)
            assert len(_children(proc.pid)) == 1  # no worker was started for it
            if limits.max_concurrent_sessions > 1:
                # Another address is not held to the first one's limit: it reaches a
                # worker (whose handshake then refuses the empty hello).
                assert "too many sessions" not in _knock(port, source="127.0.0.2")
            logits = first.forward([5, 6], [False, True])  # the running session is untouched
            assert logits.shape == (1, 300) and torch.isfinite(torch.as_tensor(logits)).all()
        finally:
            first.close()
    finally:
        stop_server(proc)


def test_token_only_reveal_gives_greedy_tokens(server, tiny_checkpoint):
    _, port = server
    settings = CryptoGenConfig(mpc=MPCSettings(reveal="token"))
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, server=f"127.0.0.1:{port}", settings=settings)
    try:
        ids = torch.tensor([[7, 8, 9]])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval().generate(ids, max_new_tokens=3, do_sample=False)
        assert out.sequences.tolist() == plain.tolist()
        # The client saw one finite entry per step: the token, no logits.
        assert all(int(torch.isfinite(step).sum()) == 1 for step in out.logits)
    finally:
        model.close()


def test_unsupported_architecture_is_refused_before_starting_a_server(tmp_path):
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        CryptoGenForCausalLM.from_pretrained(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CryptoGenForCausalLM.from_pretrained(tmp_path / "absent")


def test_server_killed_mid_generation_raises_within_the_timeout(server, tiny_checkpoint):
    proc, port = server
    settings = CryptoGenConfig(timeouts=TimeoutSettings(peer_s=15))
    model = CryptoGenForCausalLM.from_pretrained(tiny_checkpoint, server=f"127.0.0.1:{port}", settings=settings)
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
