"""Client and server on an emulated network, for ``cryptogen bench --net lan wan``.

The server runs in a network namespace of its own; the client stays in the
host's. The two are linked by a veth pair, so every byte of the session
crosses a real link between two network stacks. A network condition sets:

- the link's rate: a ``tbf`` qdisc on both ends of the veth pair (the kernel
  shapes it, packet by packet);
- its round-trip time: a delay relay on the client's side of the link that
  holds every chunk of bytes for half the round trip, in each direction.

The delay is a relay, not ``netem``, because the kernels these machines run
(and many container kernels) are built without ``sch_netem`` ("Specified
qdisc kind is unknown"); ``tbf`` is in all of them. The relay only forwards
bytes: it sees the session's TLS records, never a key. It terminates TCP on
both sides, so the emulated delay does not slow TCP's window growth the way a
real long link would; the figures are a little optimistic for that reason.

Each condition is measured on the link before it is used (``probe``): round
trip of a one-byte echo and the rate of an 8 MiB transfer, both through the
relay and the shaped link, so the report states what the session really ran on.
The relay's own round trip (measured unshaped at the start, about 0.2-0.5 ms)
is taken off the delay it adds. Its CPU is not: on 2 cores, forwarding costs
the parties some time (the shipped model at context 32: 7.6 s per token
through the unshaped link against 6.0 s on plain loopback, same code).

Needs root (or CAP_NET_ADMIN) and iproute2's ``ip`` and ``tc``. The relay and
the echo server are programs of their own (``python -m
cryptogen_hf.emulated_network relay|echo``), started here, so they need
nothing from the caller's ``__main__`` and do not share its GIL.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    rate_mbit: float | None  # None: not shaped (veth speed)
    rtt_ms: float

    def describe(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return f"{rate}, {self.rtt_ms:g} ms round trip"


# The conditions issue 17 names: a data-centre LAN and a cross-country WAN.
NETWORKS = {
    "loopback": Network(rate_mbit=None, rtt_ms=0.0),
    "lan": Network(rate_mbit=1000, rtt_ms=0.5),
    "wan": Network(rate_mbit=100, rtt_ms=40.0),
}

PROBE_BYTES = 8 << 20
_COMMAND_TIMEOUT_S = 30


class NetworkEmulationError(RuntimeError):
    """The emulated link could not be set up (no privilege, no iproute2, ...)."""


def _run(*command: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise NetworkEmulationError(f"{command[0]!r} not found: --net needs iproute2 (ip, tc)") from None
    if done.returncode != 0:
        hint = " (--net needs root or CAP_NET_ADMIN)" if "ermission" in done.stderr else ""
        raise NetworkEmulationError(f"`{' '.join(command)}` failed: {done.stderr.strip()}{hint}")


def _helper(*args: str, prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """Start this module as a program (relay or echo); returns it and the port it listens on."""
    proc = subprocess.Popen([*prefix, sys.executable, "-m", __name__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    line = proc.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise NetworkEmulationError(f"the {args[0]} helper did not start (it said {line!r})")
    return proc, int(line.split()[1])


class EmulatedLink:
    """A namespace for the server, a veth link to it, a delay relay in front.

    Use as a context manager; everything it made is removed on exit (deleting
    the namespace deletes the veth pair with it).
    """

    def __init__(self):
        pid = os.getpid()  # unique among live processes: concurrent links do not collide
        self.namespace = f"cryptogen-{pid}"
        self._host_dev, self._server_dev = f"cgh{pid}", f"cgs{pid}"  # interface names: 15 characters at most
        base = (10 << 24) | ((pid % (1 << 22)) << 2)  # a /30 of 10.0.0.0/8 per process
        self._host_addr, self.server_host = (str(ipaddress.IPv4Address(base + i)) for i in (1, 2))
        self.server_prefix = ("ip", "netns", "exec", self.namespace)
        self._relay = self._echo = None

    def __enter__(self) -> "EmulatedLink":
        _run("ip", "netns", "add", self.namespace)
        try:
            _run("ip", "link", "add", self._host_dev, "type", "veth", "peer", "name", self._server_dev)
            _run("ip", "link", "set", self._server_dev, "netns", self.namespace)
            _run("ip", "addr", "add", f"{self._host_addr}/30", "dev", self._host_dev)
            _run("ip", "link", "set", self._host_dev, "up")
            _run(*self.server_prefix, "ip", "addr", "add", f"{self.server_host}/30", "dev", self._server_dev)
            _run(*self.server_prefix, "ip", "link", "set", self._server_dev, "up")
            _run(*self.server_prefix, "ip", "link", "set", "lo", "up")
            self._relay, _ = _helper("relay")
            self._echo, echo_port = _helper("echo", "--host", self.server_host, prefix=self.server_prefix)
            self._echo_port = self.forward(echo_port)
            # The relay's own round trip (thread hand-offs, two more sockets), taken
            # off the delay it adds, so a condition's round trip is the one set:
            # its least, so that the delay never falls short; after a first probe that
            # warms the relay and echo up (their first echoes take 1-2 ms).
            self.probe()
            self.relay_rtt_ms = self.probe()["min_rtt_ms"]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in (self._relay, self._echo):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run(("ip", "netns", "del", self.namespace), capture_output=True, timeout=_COMMAND_TIMEOUT_S)

    def _relay_command(self, line: str) -> str:
        self._relay.stdin.write(line + "\n")
        self._relay.stdin.flush()
        return self._relay.stdout.readline().strip()

    def forward(self, server_port: int) -> int:
        """A loopback port on the client's side whose connections reach ``server_port`` in the namespace."""
        reply = self._relay_command(f"forward {self.server_host} {server_port}")
        if not reply.startswith("LISTENING "):
            raise NetworkEmulationError(f"the relay could not forward to port {server_port}: {reply!r}")
        return int(reply.split()[1])

    def set(self, network: Network) -> dict:
        """Switch the link to ``network`` (connections stay open) and measure it."""
        for prefix, dev in (((), self._host_dev), (self.server_prefix, self._server_dev)):
            if network.rate_mbit is None:
                subprocess.run((*prefix, "tc", "qdisc", "del", "dev", dev, "root"), capture_output=True,
                               timeout=_COMMAND_TIMEOUT_S)  # absent already: fine
            else:
                # A bucket of 1 ms of traffic (at least 16 KiB, above any packet): short
                # messages pay the rate too, as on a real link.
                burst = max(int(network.rate_mbit * 1e6 / 8 / 1000), 16 << 10)
                _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{network.rate_mbit:g}mbit",
                     "burst", str(burst), "latency", "100ms")
        one_way_ms = max(network.rtt_ms - self.relay_rtt_ms, 0.0) / 2
        if self._relay_command(f"delay {one_way_ms / 1000}") != "OK":
            raise NetworkEmulationError("the relay did not take the new delay")
        return {**self.probe(), "relay_rtt_ms": self.relay_rtt_ms}

    def probe(self) -> dict:
        """Round trip (median and least of 5 one-byte echoes) and rate (an 8 MiB transfer) of the link as it is now."""
        with socket.create_connection(("127.0.0.1", self._echo_port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(5):
                start = time.perf_counter()
                _echo_request(sock, b"x")
                rtts.append(time.perf_counter() - start)
            rtt = sorted(rtts)[2]
            start = time.perf_counter()
            _echo_request(sock, bytes(PROBE_BYTES))
            transfer = time.perf_counter() - start
        return {"rtt_ms": round(rtt * 1000, 2), "min_rtt_ms": round(min(rtts) * 1000, 2),
                "mbit_per_s": round(PROBE_BYTES * 8 / 1e6 / max(transfer - rtt, 1e-6), 1)}


def _echo_request(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("!Q", len(payload)) + payload)
    if _recv_exact(sock, 1) != b"!":
        raise NetworkEmulationError("the echo server answered wrongly")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            raise ConnectionError("peer closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


# -- the helper programs ------------------------------------------------------

def _echo_main(host: str) -> None:
    """Answer each request (8-byte length, then that many bytes) with one byte, once all of it arrived."""
    listener = socket.create_server((host, 0))
    print(f"LISTENING {listener.getsockname()[1]}", flush=True)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while True:
                    (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                    _recv_exact(conn, n)
                    conn.sendall(b"!")
            except (ConnectionError, OSError):
                return

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class _Relay:
    """Forwards connections, holding every chunk of bytes for ``one_way_s`` in each direction."""

    def __init__(self):
        self.one_way_s = 0.0

    def forward(self, host: str, port: int) -> int:
        listener = socket.create_server(("127.0.0.1", 0))

        def accept_loop() -> None:
            while True:
                client, _ = listener.accept()
                try:
                    server = socket.create_connection((host, port), timeout=30)
                except OSError:
                    client.close()
                    continue
                server.settimeout(None)
                for sock in (client, server):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._pump(client, server)
                self._pump(server, client)

        threading.Thread(target=accept_loop, daemon=True).start()
        return listener.getsockname()[1]

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """One direction: a reader stamps each chunk with when it may leave, a writer sends it then."""
        due = queue.SimpleQueue()

        def read() -> None:
            try:
                while chunk := src.recv(1 << 20):
                    due.put((time.monotonic() + self.one_way_s, chunk))
            except OSError:
                pass
            due.put(None)

        def write() -> None:
            try:
                while (item := due.get()) is not None:
                    wait = item[0] - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(item[1])
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                src.close()

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()


def _relay_main() -> None:
    """Commands on stdin, one per line: ``forward HOST PORT`` (answers ``LISTENING port``)
    and ``delay SECONDS`` (one way; answers ``OK``). Ends when stdin closes."""
    relay = _Relay()
    print("LISTENING 0", flush=True)  # ready; it listens once told where to forward
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["forward"] and len(words) == 3:
            print(f"LISTENING {relay.forward(words[1], int(words[2]))}", flush=True)
        elif words[:1] == ["delay"] and len(words) == 2:
            relay.one_way_s = float(words[1])
            print("OK", flush=True)
        else:
            print(f"ERROR unknown command {line.strip()!r}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cryptogen_hf.emulated_network")
    sub = parser.add_subparsers(dest="program", required=True)
    sub.add_parser("relay", help="the delay relay (client side)")
    echo = sub.add_parser("echo", help="the probe's echo server (server side)")
    echo.add_argument("--host", required=True)
    args = parser.parse_args(argv)
    if args.program == "relay":
        _relay_main()
    else:
        _echo_main(args.host)


if __name__ == "__main__":
    main()
