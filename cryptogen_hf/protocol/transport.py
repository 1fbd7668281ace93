"""The one connection between the two parties: framed, timed, optionally TLS.

Everything the parties exchange in a session crosses one TCP connection (TLS
in every session; see :mod:`cryptogen_hf.protocol.credentials`): the
handshake and requests, the serialized ciphertexts and masked vectors, and
all of CrypTen's secret-share traffic (:mod:`cryptogen_hf.mpc.channel_comm`
puts CrypTen's communicator on this channel). Nothing else listens.

Wire format of one message::

    magic   4 bytes  b"CGv1"
    kind    2 bytes  length, then that many UTF-8 bytes (what the message is)
    payload 8 bytes  length, then that many bytes

Two streams share the connection: messages of kind ``"mpc"`` (CrypTen's) and
all others (the protocol's). Each stream is delivered in order; a message of
the other stream that arrives while a party waits is queued for that stream
(at most ``MAX_QUEUED_BYTES``). So the two layers keep the independence they
had on two sockets, and neither has to know when the other sends.

The socket is non-blocking and driven from the calling thread only (an
``ssl.SSLSocket`` must not be used from two threads at once): a send that
cannot go out at once keeps reading whatever the peer sends meanwhile, so two
parties that send large messages to each other at the same moment never
deadlock, and a send returns once every byte is with the kernel.

Every receive has a deadline: a peer that dies raises :class:`PeerClosedError`
at once, a peer that stops answering raises :class:`PeerTimeoutError` after
``timeout_s``; both name the peer. A message of an unexpected kind, or longer
than the limit for its kind (``Channel.limits``), raises
:class:`ProtocolError` from its header, before any of its payload is read. An
``"error"`` message from the peer is raised as :class:`PeerReportedError`
whichever stream is waiting.
"""

from __future__ import annotations

import collections
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

MAGIC = b"CGv1"
# Refuse absurd lengths before allocating: a corrupted header must not make us
# try to read (or allocate) terabytes.
MAX_PAYLOAD_BYTES = 1 << 34
MAX_ERROR_BYTES = 1 << 16  # an error message is a line of text
# Bytes of one stream's messages held while the other stream is read: an
# honest peer is never more than a pass ahead; a flooding one is cut off here.
MAX_QUEUED_BYTES = 1 << 30
MPC_KIND = "mpc"  # CrypTen's stream; every other kind is the protocol's
_CHUNK = 1 << 20
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TransportError(RuntimeError):
    """Base class: something went wrong talking to the peer."""


class PeerClosedError(TransportError):
    """The peer closed the connection or its process died."""


class PeerTimeoutError(TransportError):
    """The peer did not answer within the timeout."""


class ProtocolError(TransportError):
    """The peer sent something that is not the message the protocol expects."""


class CertificateError(TransportError):
    """The server's TLS certificate is not the one the client trusts."""


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
    # kind -> bytes under that kind, so a benchmark can attribute traffic.
    bytes_received_by_kind: dict = field(default_factory=dict)
    bytes_sent_by_kind: dict = field(default_factory=dict)

    def reset(self):
        self.bytes_sent = self.bytes_received = 0
        self.messages_sent = self.messages_received = 0
        self.bytes_received_by_kind = {}
        self.bytes_sent_by_kind = {}


def _stream_of(kind: str) -> str:
    return MPC_KIND if kind == MPC_KIND else "protocol"


class Channel:
    """One side of the framed connection to the named peer (plain or TLS socket)."""

    def __init__(self, sock: socket.socket, peer_name: str, timeout_s: float = 60.0, recorder=None):
        self.sock = sock
        self.peer_name = peer_name
        self.timeout_s = float(timeout_s)
        self.stats = ChannelStats()
        # recorder(kind, payload) is called on every message as it arrives (also
        # one read ahead while another stream was awaited); the transcript-audit
        # tests use it to inspect every byte a party receives.
        self.recorder = recorder
        # kind -> the longest payload accepted for it (others: MAX_PAYLOAD_BYTES).
        self.limits: dict[str, int] = {"error": MAX_ERROR_BYTES}
        self.tls = isinstance(sock, ssl.SSLSocket)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self._inbuf = bytearray()
        self._header: tuple[str, int, int] | None = None  # (kind, header bytes, payload length) being read
        self._payload: bytearray | None = None  # a payload being read in place, and how much of it has come
        self._filled = 0
        self._queues = {"protocol": collections.deque(), MPC_KIND: collections.deque()}
        self._queued_bytes = 0
        self._closed_by_peer = False
        self._expecting: dict[str, str] = {}  # stream -> the kind a receive is waiting for
        self._broken: ProtocolError | None = None  # after a refused message the byte stream is out of step for good

    # ---------------------------------------------------------------- sending
    def send(self, kind: str, payload=b"") -> None:
        """Send one message; returns when all of it is with the kernel."""
        kind_bytes = kind.encode("utf-8")
        header = MAGIC + struct.pack("<H", len(kind_bytes)) + kind_bytes + struct.pack("<Q", len(payload))
        deadline = time.monotonic() + self.timeout_s
        for part in (header, payload):
            view = memoryview(part).cast("B")
            while view:
                chunk = view[:_CHUNK]  # retried unchanged after a would-block (TLS requires it)
                try:
                    sent = self.sock.send(chunk)
                except _WOULD_BLOCK:
                    self._wait(deadline, f"sending {kind!r}", want_write=True)
                    continue
                except OSError as exc:
                    raise PeerClosedError(f"connection to {self.peer_name} lost while sending {kind!r}: {exc}") from exc
                view = view[sent:]
        self.stats.bytes_sent += len(header) + len(payload)
        self.stats.messages_sent += 1
        self.stats.bytes_sent_by_kind[kind] = self.stats.bytes_sent_by_kind.get(kind, 0) + len(payload)

    # -------------------------------------------------------------- receiving
    def recv(self, expect_kind: str | None = None, timeout_s: float | None = None) -> tuple[str, bytes]:
        """Receive the next message of the protocol stream (or, for
        ``expect_kind="mpc"``, of CrypTen's); anything but ``expect_kind`` is a
        ProtocolError, and an "error" from the peer is raised as PeerReportedError."""
        stream = _stream_of(expect_kind or "")
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        what = f"{expect_kind!r}" if expect_kind else "a message"
        queue = self._queues[stream]
        if expect_kind is not None:
            self._expecting[stream] = expect_kind
        try:
            while not queue:
                self._wait(deadline, f"waiting for {what}", want_write=False)
        finally:
            self._expecting.pop(stream, None)
        kind, payload = queue.popleft()
        self._queued_bytes -= len(payload)
        if expect_kind is not None and kind != expect_kind:
            raise ProtocolError(f"expected {expect_kind!r} from {self.peer_name}, got {kind!r}")
        return kind, payload

    def recv_payload(self, expect_kind: str, timeout_s: float | None = None) -> bytes:
        return self.recv(expect_kind, timeout_s)[1]

    # ------------------------------------------------------------ the engine
    def _wait(self, deadline: float, doing: str, want_write: bool) -> None:
        """Block until the socket can move bytes (or the deadline passes), then
        read whatever has arrived into the stream queues."""
        if self._broken is not None:
            raise ProtocolError(f"connection to {self.peer_name} is unusable after an earlier refused message: {self._broken}")
        if self._closed_by_peer:
            raise PeerClosedError(f"{self.peer_name} closed the connection while we were {doing} (its process may have died)")
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeoutError(
                f"{self.peer_name}: no progress {doing} within {self.timeout_s:.0f} s "
                f"(peer stopped answering or is overloaded)"
            )
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | (select.POLLOUT if want_write else 0))
            events = poller.poll(left * 1000)
        except (OSError, ValueError) as exc:
            raise PeerClosedError(f"connection to {self.peer_name} lost while {doing}: {exc}") from exc
        if any(mask & (select.POLLIN | select.POLLHUP | select.POLLERR) for _, mask in events):
            self._read_available(doing)

    def _read_available(self, doing: str) -> None:
        """Read until the socket would block; parse and queue complete messages.

        Headers are parsed from a small buffer; a payload that did not arrive
        with its header is read straight into a buffer of its announced size
        (allocated only after the header passed its checks), so a large
        message costs its size once, plus the final bytes copy."""
        while True:
            try:
                if self._payload is not None:
                    view = memoryview(self._payload)[self._filled :]
                    n = self.sock.recv_into(view, min(len(view), _CHUNK))
                    data = None
                else:
                    data = self.sock.recv(_CHUNK)
                    n = len(data)
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                raise PeerClosedError(f"connection to {self.peer_name} lost while {doing}: {exc}") from exc
            if not n:
                self._closed_by_peer = True
                if self._header is not None or self._inbuf:
                    raise PeerClosedError(f"{self.peer_name} closed the connection in the middle of a message while we were {doing}")
                return
            if data is None:
                self._filled += n
                if self._filled == len(self._payload):
                    payload, self._payload = bytes(self._payload), None
                    self._finish(payload)
                continue
            self._inbuf += data
            try:
                self._parse()
            except ProtocolError as exc:
                self._broken = exc
                raise

    def _parse(self) -> None:
        buf = self._inbuf
        while self._payload is None:
            if self._header is None:
                if len(buf) < 6:
                    return
                if buf[:4] != MAGIC:
                    raise ProtocolError(f"{self.peer_name} sent bytes that are not a cryptogen_hf message (bad magic {bytes(buf[:4])!r})")
                (kind_len,) = struct.unpack_from("<H", buf, 4)
                if len(buf) < 14 + kind_len:
                    return
                kind = bytes(buf[6 : 6 + kind_len]).decode("utf-8", errors="replace")
                (length,) = struct.unpack_from("<Q", buf, 6 + kind_len)
                # Judged from the header alone: nothing is read or allocated for a message refused here.
                stream = _stream_of(kind)
                due = self._expecting.get(stream)
                if due is not None and kind not in (due, "error") and not self._queues[stream]:
                    raise ProtocolError(f"expected {due!r} from {self.peer_name}, got {kind!r}")
                limit = self.limits.get(kind, MAX_PAYLOAD_BYTES)
                if length > limit:
                    raise ProtocolError(f"{self.peer_name} announced a {length}-byte {kind!r} message (limit {limit}); refusing")
                if self._queued_bytes + length > MAX_QUEUED_BYTES:
                    raise ProtocolError(f"{self.peer_name} sent more than {MAX_QUEUED_BYTES} bytes ahead of the protocol; refusing")
                self._header = (kind, 14 + kind_len, length)
                del buf[: 14 + kind_len]
            length = self._header[2]
            if len(buf) >= length:
                payload = bytes(memoryview(buf)[:length])
                del buf[:length]
                self._finish(payload)
            else:  # the rest goes straight into the payload's own buffer
                self._payload = bytearray(length)
                self._payload[: len(buf)] = buf
                self._filled = len(buf)
                del buf[:]

    def _finish(self, payload: bytes) -> None:
        kind, header_len, _ = self._header
        self._header = None
        self._deliver(kind, payload, header_len)

    def _deliver(self, kind: str, payload: bytes, header_len: int) -> None:
        self.stats.bytes_received += header_len + len(payload)
        self.stats.messages_received += 1
        self.stats.bytes_received_by_kind[kind] = self.stats.bytes_received_by_kind.get(kind, 0) + len(payload)
        if self.recorder is not None:
            self.recorder(kind, payload)
        if kind == "error":
            raise PeerReportedError(self.peer_name, payload.decode("utf-8", errors="replace"))
        self._queues[_stream_of(kind)].append((kind, payload))
        self._queued_bytes += len(payload)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def connect(host: str, port: int, peer_name: str, timeout_s: float = 60.0, retry_s: float = 0.0,
            tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> Channel:
    """Connect to a listening peer, retrying for ``retry_s`` seconds while it starts up;
    with ``tls``, run the TLS handshake (and the certificate check) before returning."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise PeerClosedError(f"cannot reach {peer_name} at {host}:{port}: {exc}") from exc
            time.sleep(0.05)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)  # handshake, blocking, timed
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise CertificateError(
                f"{peer_name} at {host}:{port} presented a certificate that does not verify "
                f"against the one this client trusts ({exc.verify_message}); refusing to talk to it"
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise PeerClosedError(f"TLS handshake with {peer_name} at {host}:{port} failed: {exc}") from exc
    return Channel(sock, peer_name, timeout_s)


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free port (read it from ``getsockname()``)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    return server


def accept(server: socket.socket, peer_name: str, timeout_s: float = 60.0, tls: ssl.SSLContext | None = None) -> Channel:
    """Accept one connection (and with ``tls`` run the server's side of the handshake)."""
    server.settimeout(timeout_s)
    try:
        sock, _ = server.accept()
    except socket.timeout as exc:
        raise PeerTimeoutError(f"{peer_name} did not connect within {timeout_s:.0f} s") from exc
    if tls is not None:
        sock = server_handshake(sock, tls, timeout_s, peer_name)
    return Channel(sock, peer_name, timeout_s)


def server_handshake(sock: socket.socket, tls: ssl.SSLContext, timeout_s: float, peer_name: str) -> ssl.SSLSocket:
    """The server's side of the TLS handshake on an accepted socket, within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        return tls.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise PeerClosedError(f"TLS handshake with {peer_name} failed: {exc}") from exc
