"""The framed channel: exact delivery, kinds enforced, timeouts and dead peers reported."""

import os
import struct
import threading
import time

import pytest

from cryptogen_hf.protocol import credentials, transport


@pytest.fixture()
def pair():
    server = transport.listen()
    port = server.getsockname()[1]
    holder = {}
    t = threading.Thread(target=lambda: holder.setdefault("a", transport.accept(server, "client", timeout_s=5)))
    t.start()
    b = transport.connect("127.0.0.1", port, "server", timeout_s=2)
    t.join()
    a = holder["a"]
    yield a, b
    a.close()
    b.close()
    server.close()


def test_messages_arrive_exactly_and_are_counted(pair):
    a, b = pair
    payload = os.urandom(3_000_000)
    b.send("ciphertext", payload)
    kind, got = a.recv("ciphertext")
    assert kind == "ciphertext" and got == payload
    assert a.stats.bytes_received_by_kind["ciphertext"] == len(payload)
    assert b.stats.bytes_sent == a.stats.bytes_received


def test_unexpected_kind_is_a_protocol_error(pair):
    a, b = pair
    b.send("masked_shares", b"x")
    with pytest.raises(transport.ProtocolError, match="expected 'ciphertext'"):
        a.recv("ciphertext")


def test_silent_peer_times_out_naming_it(pair):
    a, _ = pair
    start = time.monotonic()
    with pytest.raises(transport.PeerTimeoutError, match="client"):
        a.recv("ciphertext", timeout_s=0.5)
    assert time.monotonic() - start < 2


def test_closed_peer_is_reported_at_once(pair):
    a, b = pair
    b.close()
    with pytest.raises(transport.PeerClosedError, match="closed the connection"):
        a.recv("ciphertext", timeout_s=10)


def test_garbage_is_rejected_not_misread(pair):
    a, b = pair
    b.sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(transport.ProtocolError, match="bad magic"):
        a.recv()


def test_peer_error_message_is_raised(pair):
    a, b = pair
    b.send("error", b"model mismatch: server has tiny-gpt2")
    with pytest.raises(transport.TransportError, match="model mismatch"):
        a.recv("ciphertext")


def _announce(channel, kind: str, length: int) -> None:
    """A header announcing `length` payload bytes, and none of them."""
    kind_bytes = kind.encode()
    channel.sock.sendall(transport.MAGIC + struct.pack("<H", len(kind_bytes)) + kind_bytes + struct.pack("<Q", length))


def _refused_at_once(channel, expect_kind: str, match: str) -> None:
    start = time.monotonic()
    with pytest.raises(transport.ProtocolError, match=match):
        channel.recv(expect_kind, timeout_s=10)
    assert time.monotonic() - start < 1  # from the header: no payload awaited


def test_wrong_kind_is_refused_from_its_header(pair):
    """8 GiB of junk announced where a hello is due: refused at once, without
    waiting for (or allocating) the payload."""
    a, b = pair
    _announce(b, "junk", 8 << 30)
    _refused_at_once(a, "hello", "expected 'hello'")


@pytest.mark.parametrize("kind, length, match", [
    ("hello", 1001, "limit 1000"),
    ("error", transport.MAX_ERROR_BYTES + 1, "'error' message"),  # error messages are short too
])
def test_per_kind_size_limit_is_checked_from_the_header(pair, kind, length, match):
    a, b = pair
    a.limits["hello"] = 1000
    _announce(b, kind, length)
    _refused_at_once(a, "hello", match)
    with pytest.raises(transport.ProtocolError, match="unusable after an earlier refused message"):
        a.recv("hello", timeout_s=1)  # the byte stream is out of step: nothing more is read


def test_the_two_streams_are_independent_and_simultaneous_large_sends_do_not_deadlock(pair):
    a, b = pair
    # b sends CrypTen's message first, then a protocol message; a reads them the other way round.
    b.send(transport.MPC_KIND, b"shares")
    b.send("request", b"{}")
    assert a.recv("request") == ("request", b"{}")
    assert a.recv(transport.MPC_KIND) == (transport.MPC_KIND, b"shares")
    # Both send 64 MiB at once from one thread each, far more than the socket buffers hold:
    # each send keeps reading the other's message meanwhile.
    big = {name: os.urandom(1 << 20) * 64 for name in "ab"}
    done = {}
    t = threading.Thread(target=lambda: (b.send(transport.MPC_KIND, big["b"]), done.setdefault("b", b.recv(transport.MPC_KIND))))
    t.start()
    a.send(transport.MPC_KIND, big["a"])
    assert a.recv(transport.MPC_KIND)[1] == big["b"]
    t.join(timeout=30)
    assert done["b"][1] == big["a"]


def test_a_peer_that_floods_the_other_stream_is_cut_off(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(transport, "MAX_QUEUED_BYTES", 1 << 20)
    for _ in range(3):
        b.send(transport.MPC_KIND, b"x" * (400 << 10))  # nobody reads CrypTen's stream yet
    b.send("request", b"{}")
    with pytest.raises(transport.ProtocolError, match="bytes ahead of the protocol"):
        a.recv("request", timeout_s=10)


def test_tls_channel_carries_both_streams_and_pins_the_certificate(tmp_path):
    cert, key = credentials.self_signed_certificate(["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    server_tls = credentials.server_tls_context(tmp_path / "c.pem", tmp_path / "k.pem")
    listener = transport.listen()
    holder = {}
    t = threading.Thread(target=lambda: holder.setdefault("a", transport.accept(listener, "client", timeout_s=10, tls=server_tls)))
    t.start()
    b = transport.connect("127.0.0.1", listener.getsockname()[1], "server", timeout_s=10, tls=credentials.client_tls_context(cert))
    t.join()
    a = holder["a"]
    try:
        assert a.tls and b.tls and b.sock.version() == "TLSv1.3"
        payload = os.urandom(5_000_000)
        sender = threading.Thread(target=lambda: (b.send(transport.MPC_KIND, payload), b.send("request", b"{}")))
        sender.start()
        assert a.recv("request")[1] == b"{}" and a.recv(transport.MPC_KIND)[1] == payload
        sender.join()
        a.send("reply", payload[:100])
        assert b.recv("reply")[1] == payload[:100]
    finally:
        a.close()
        b.close()
        listener.close()
