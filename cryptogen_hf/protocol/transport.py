"""Framed, timed message channel between the two parties (ciphertexts, masked values).

CrypTen carries secret shares over its own torch.distributed group; everything
else the parties exchange (serialized ciphertexts, masked vectors, the
handshake) goes over one TCP connection wrapped by :class:`Channel`.

Wire format of one message::

    magic   4 bytes  b"CGv1"
    kind    2 bytes  length, then that many UTF-8 bytes (what the message is)
    payload 8 bytes  length, then that many bytes

Every receive has a deadline: a peer that dies raises :class:`PeerClosedError`
at once, a peer that stops answering raises :class:`PeerTimeoutError` after
``timeout_s``; both name the peer. A message of an unexpected kind, or
longer than the limit for its kind (``Channel.limits``), raises
:class:`ProtocolError` from its header, before any of its payload is read.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

MAGIC = b"CGv1"
# Refuse absurd lengths before allocating: a corrupted header must not make us
# try to read (or allocate) terabytes.
MAX_PAYLOAD_BYTES = 1 << 34
MAX_ERROR_BYTES = 1 << 16  # an error message is a line of text


class TransportError(RuntimeError):
    """Base class: something went wrong talking to the peer."""


class PeerClosedError(TransportError):
    """The peer closed the connection or its process died."""


class PeerTimeoutError(TransportError):
    """The peer did not answer within the timeout."""


class ProtocolError(TransportError):
    """The peer sent something that is not the message the protocol expects."""


class PeerReportedError(TransportError):
    """The peer sent an "error" message; ``peer_message`` is its text."""

    def __init__(self, peer_name: str, peer_message: str):
        super().__init__(f"{peer_name} reported an error: {peer_message}")
        self.peer_message = peer_message


@dataclass
class ChannelStats:
    """What crossed the channel, for benchmarks and the transcript audit."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    # kind -> bytes received under that kind, so a benchmark can attribute traffic.
    bytes_received_by_kind: dict = field(default_factory=dict)

    def reset(self):
        self.bytes_sent = self.bytes_received = 0
        self.messages_sent = self.messages_received = 0
        self.bytes_received_by_kind = {}


class Channel:
    """One side of a framed TCP connection to the named peer."""

    def __init__(self, sock: socket.socket, peer_name: str, timeout_s: float = 60.0, recorder=None):
        self.sock = sock
        self.peer_name = peer_name
        self.timeout_s = float(timeout_s)
        self.stats = ChannelStats()
        # recorder(kind, payload) is called on every received message; the
        # transcript-audit tests use it to inspect every byte a party receives.
        self.recorder = recorder
        # kind -> the longest payload accepted for it (others: MAX_PAYLOAD_BYTES).
        self.limits: dict[str, int] = {"error": MAX_ERROR_BYTES}
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---------------------------------------------------------------- sending
    def send(self, kind: str, payload: bytes = b"") -> None:
        kind_bytes = kind.encode("utf-8")
        header = MAGIC + struct.pack("<H", len(kind_bytes)) + kind_bytes + struct.pack("<Q", len(payload))
        try:
            self.sock.settimeout(self.timeout_s)
            self.sock.sendall(header)
            if payload:
                self.sock.sendall(payload)
        except socket.timeout as exc:
            raise PeerTimeoutError(f"sending {kind!r} to {self.peer_name} timed out after {self.timeout_s:.0f} s") from exc
        except OSError as exc:
            raise PeerClosedError(f"connection to {self.peer_name} lost while sending {kind!r}: {exc}") from exc
        self.stats.bytes_sent += len(header) + len(payload)
        self.stats.messages_sent += 1

    # -------------------------------------------------------------- receiving
    def recv(self, expect_kind: str | None = None, timeout_s: float | None = None) -> tuple[str, bytes]:
        """Receive one message; if ``expect_kind`` is given, anything else is a ProtocolError.

        A message of kind "error" from the peer is raised as a TransportError
        carrying the peer's message (so a server-side failure reaches the user).
        """
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        what = f"{expect_kind!r}" if expect_kind else "a message"
        magic = self._recv_exact(4, deadline, what)
        if magic != MAGIC:
            raise ProtocolError(f"{self.peer_name} sent bytes that are not a cryptogen_hf message (bad magic {magic!r})")
        (kind_len,) = struct.unpack("<H", self._recv_exact(2, deadline, what))
        kind = self._recv_exact(kind_len, deadline, what).decode("utf-8", errors="replace")
        (length,) = struct.unpack("<Q", self._recv_exact(8, deadline, what))
        # Judged from the header alone: nothing is read or allocated for a message refused here.
        if expect_kind is not None and kind not in (expect_kind, "error"):
            raise ProtocolError(f"expected {expect_kind!r} from {self.peer_name}, got {kind!r}")
        limit = self.limits.get(kind, MAX_PAYLOAD_BYTES)
        if length > limit:
            raise ProtocolError(f"{self.peer_name} announced a {length}-byte {kind!r} message (limit {limit}); refusing")
        payload = self._recv_exact(length, deadline, what) if length else b""
        self.stats.bytes_received += 14 + kind_len + length
        self.stats.messages_received += 1
        self.stats.bytes_received_by_kind[kind] = self.stats.bytes_received_by_kind.get(kind, 0) + length
        if self.recorder is not None:
            self.recorder(kind, payload)
        if kind == "error" and expect_kind != "error":
            raise PeerReportedError(self.peer_name, payload.decode("utf-8", errors="replace"))
        return kind, payload

    def recv_payload(self, expect_kind: str, timeout_s: float | None = None) -> bytes:
        return self.recv(expect_kind, timeout_s)[1]

    def _recv_exact(self, n: int, deadline: float, what: str) -> bytes:
        chunks = []
        remaining = n
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeoutError(
                    f"{self.peer_name} did not send {what} within {self.timeout_s:.0f} s "
                    f"(peer stopped answering or is overloaded)"
                )
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(remaining, 1 << 22))
            except socket.timeout:
                continue  # loop re-checks the deadline and raises with the message above
            except OSError as exc:
                raise PeerClosedError(f"connection to {self.peer_name} lost while waiting for {what}: {exc}") from exc
            if not chunk:
                raise PeerClosedError(f"{self.peer_name} closed the connection while we waited for {what} (its process may have died)")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def connect(host: str, port: int, peer_name: str, timeout_s: float = 60.0, retry_s: float = 0.0) -> Channel:
    """Connect to a listening peer, retrying for ``retry_s`` seconds while it starts up."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            return Channel(sock, peer_name, timeout_s)
        except (ConnectionRefusedError, socket.timeout, OSError) as exc:
            if time.monotonic() >= deadline:
                raise PeerClosedError(f"cannot reach {peer_name} at {host}:{port}: {exc}") from exc
            time.sleep(0.05)


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free port (read it from ``getsockname()``)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    return server


def accept(server: socket.socket, peer_name: str, timeout_s: float = 60.0) -> Channel:
    server.settimeout(timeout_s)
    try:
        sock, _ = server.accept()
    except socket.timeout as exc:
        raise PeerTimeoutError(f"{peer_name} did not connect within {timeout_s:.0f} s") from exc
    return Channel(sock, peer_name, timeout_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on loopback (for CrypTen's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
