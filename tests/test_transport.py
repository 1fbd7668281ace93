"""The framed channel: exact delivery, kinds enforced, timeouts and dead peers reported."""

import os
import struct
import threading
import time

import pytest

from cryptogen_hf.protocol import transport


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


def test_per_kind_size_limit_is_checked_from_the_header(pair):
    a, b = pair
    a.limits["hello"] = 1000
    _announce(b, "hello", 1001)
    _refused_at_once(a, "hello", "limit 1000")
    _announce(b, "error", transport.MAX_ERROR_BYTES + 1)  # error messages are short too
    _refused_at_once(a, "hello", "'error' message")
