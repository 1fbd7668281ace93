"""Correlated randomness made by the two parties alone (``dealer: none``).

CrypTen's protocols consume Beaver triples (``a, b, c = a*b``), square pairs,
binary AND triples and B2A bits. Here each party draws its own share of every
random operand from its private AES-CTR generator, and the one term neither
can compute alone, the cross product ``x_server * y_client + x_client *
y_server``, comes from :mod:`cryptogen_hf.he.ole` (the client's BFV keys,
re-randomised and noise-flooded replies). Per request, two messages:

    client -> server   Enc(x_client), Enc(y_client)
    server -> client   Enc(cross + R)          (server keeps -R)

What each party sees: the server sees ciphertexts under a key it does not
hold; the client sees cross + R with R uniform over a range 2**40 or more
times wider than the cross term, and noise flooded to the same margin. So
neither learns anything about the other's shares, hence about any value
opened with them.

Shapes: every request is elementwise over the broadcast shape (a matmul
triple is the elementwise triple of the expanded product, summed), so one
HE code path serves every tuple kind.
"""

from __future__ import annotations

import struct
import time

import numpy as np
import torch
import torch.distributed as dist

from cryptogen_hf.crypten_compat import import_crypten

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402  (after the shim)
from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element  # noqa: E402
from crypten.config import cfg  # noqa: E402
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor  # noqa: E402
from crypten.mpc.provider.provider import TupleProvider  # noqa: E402

from ..he.ole import OLEClient, OLEServer  # noqa: E402

PROVIDER_NAME = "CRYPTOGEN_TWO_PARTY"
SERVER_RANK, CLIENT_RANK = 0, 1  # as in runtime (which imports this module)
# Largest message the receiver accepts (a malformed length must not make it
# allocate gigabytes): one request never exceeds this many bytes.
MAX_MESSAGE_BYTES = 1 << 31


class CorrelationError(RuntimeError):
    """A correlated-randomness message was malformed or too large."""


# ---------------------------------------------------------------------------
# Messages: a list of byte strings as one length-prefixed uint8 tensor
# ---------------------------------------------------------------------------
def _send_blobs(blobs: list[bytes], dst: int) -> None:
    header = struct.pack(f"<Q{len(blobs)}Q", len(blobs), *map(len, blobs))
    payload = np.frombuffer(header + b"".join(blobs), dtype=np.uint8)
    group = comm.get().main_group
    dist.send(torch.tensor([payload.size], dtype=torch.long), dst, group=group)
    dist.send(torch.from_numpy(payload.copy()), dst, group=group)
    _log_traffic(payload.size)


def _recv_blobs(src: int) -> list[bytes]:
    group = comm.get().main_group
    size = torch.empty(1, dtype=torch.long)
    dist.recv(size, src, group=group)
    n_bytes = int(size.item())
    if not 8 <= n_bytes <= MAX_MESSAGE_BYTES:
        raise CorrelationError(f"correlated-randomness message of {n_bytes} bytes (limit {MAX_MESSAGE_BYTES})")
    payload = torch.empty(n_bytes, dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    _log_traffic(n_bytes)
    data = payload.numpy().tobytes()
    (count,) = struct.unpack_from("<Q", data, 0)
    if 8 + 8 * count > n_bytes:
        raise CorrelationError(f"correlated-randomness message announces {count} parts in {n_bytes} bytes")
    lengths = struct.unpack_from(f"<{count}Q", data, 8)
    offset = 8 + 8 * count
    if offset + sum(lengths) != n_bytes:
        raise CorrelationError("correlated-randomness message: part lengths do not add up to its size")
    blobs = []
    for length in lengths:
        blobs.append(data[offset : offset + length])
        offset += length
    return blobs


def _log_traffic(n_bytes: int) -> None:
    if cfg.communicator.verbose:
        comm.get()._log_communication(-(-n_bytes // 8))  # CrypTen counts 8-byte elements


def _as_u64(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).numpy().view(np.uint64)


_BIT_SHIFTS = torch.arange(64, dtype=torch.long)


def _unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """(n,) int64 words -> (n, 64) 0/1 int64, bit k of word i at [i, k]."""
    return (words.reshape(-1, 1) >> _BIT_SHIFTS) & 1


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n, 64) 0/1 -> (n,) int64 words (bit 63 wraps into the sign, as intended)."""
    return (bits << _BIT_SHIFTS).sum(-1)


class TwoPartyProvider(TupleProvider):
    """CrypTen tuple provider for two parties and no dealer."""

    NAME = PROVIDER_NAME

    def __init__(self):
        super().__init__()
        self._client: OLEClient | None = None
        self._server: OLEServer | None = None
        self.stats = {"seconds": 0.0, "requests": 0, "arithmetic": 0, "and_bits": 0, "b2a_bits": 0}

    # -- session set-up: the client's cross-product public keys ------------------
    def setup(self, rank: int) -> None:
        start = time.perf_counter()
        if rank == CLIENT_RANK:
            self._client = OLEClient()
            _send_blobs(self._client.public_keys(), SERVER_RANK)
        else:
            self._server = OLEServer(_recv_blobs(CLIENT_RANK))
        self.stats["setup_seconds"] = time.perf_counter() - start

    def _local_prg(self):
        return crypten.generators["local"][torch.device("cpu")]

    # -- the one HE exchange --------------------------------------------------
    def _cross(self, x: torch.Tensor, y: torch.Tensor, wide: bool) -> torch.Tensor:
        """This party's share (int64, mod 2**64) of x_server*y_client + x_client*y_server,
        elementwise; x and y are this party's own values (same shape)."""
        if x.shape != y.shape:
            raise ValueError(f"cross product of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.long)
        start = time.perf_counter()
        xs, ys = _as_u64(x), _as_u64(y)
        if self._client is not None:
            _send_blobs(self._client.encrypt(xs, ys, wide), SERVER_RANK)
            share = self._client.decrypt(_recv_blobs(SERVER_RANK), xs.size, wide)
        elif self._server is not None:
            replies, share = self._server.evaluate(_recv_blobs(CLIENT_RANK), xs, ys, wide, self._local_prg())
            _send_blobs(replies, CLIENT_RANK)
        else:
            raise RuntimeError("two-party correlations used before setup() (no HE keys exchanged)")
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["requests"] += 1
        return torch.from_numpy(share.view(np.int64).copy()).reshape(x.shape)

    # -- CrypTen's TupleProvider interface ---------------------------------------
    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if args or kwargs:
            raise ValueError(f"two-party triples for torch.{op} with extra arguments are not supported")
        a = generate_random_ring_element(size0)
        b = generate_random_ring_element(size1)
        if op == "mul":
            shape = torch.broadcast_shapes(a.shape, b.shape)
            cross = self._cross(a.expand(shape), b.expand(shape), wide=True)
        elif op == "matmul":
            if a.dim() < 2 or b.dim() < 2:
                raise ValueError("two-party matmul triples need operands of at least 2 dims")
            # (..., I, K) x (..., K, J): the elementwise triple of every a_ik b_kj, summed over k.
            left, right = a.unsqueeze(-1), b.unsqueeze(-3)
            shape = torch.broadcast_shapes(left.shape, right.shape)
            cross = self._cross(left.expand(shape), right.expand(shape), wide=True).sum(-2)
        else:
            raise ValueError(f"two-party triples: torch.{op} is not supported (mul, matmul)")
        self.stats["arithmetic"] += int(np.prod(shape))
        c = getattr(torch, op)(a, b) + cross
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))

    def square(self, size, device=None):
        r = generate_random_ring_element(size)
        cross = self._cross(r, r, wide=True)  # r0 r1 + r1 r0
        self.stats["arithmetic"] += r.numel()
        return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(r * r + cross, precision=0)

    def generate_binary_triple(self, size0, size1, device=None):
        a = generate_kbit_random_tensor(size0)
        b = generate_kbit_random_tensor(size1)
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a, b = a.expand(shape).contiguous(), b.expand(shape).contiguous()
        # a0 b1 + a1 b0 per bit; the low bit of each arithmetic share is an
        # XOR share of that sum mod 2, i.e. of a0 b1 XOR a1 b0.
        cross = self._cross(_unpack_bits(a), _unpack_bits(b), wide=False) & 1
        self.stats["and_bits"] += 64 * a.numel()
        c = (a & b) ^ _pack_bits(cross).reshape(shape)
        return tuple(BinarySharedTensor.from_shares(t) for t in (a, b, c))

    def B2A_rng(self, size, device=None):
        r = generate_kbit_random_tensor(size, bitlength=1)
        # r = r0 XOR r1 = r0 + r1 - 2 r0 r1; the cross product gives shares of 2 r0 r1.
        r_arith = r - self._cross(r, r, wide=False)
        self.stats["b2a_bits"] += r.numel()
        return ArithmeticSharedTensor.from_shares(r_arith, precision=0), BinarySharedTensor.from_shares(r)

    def wrap_rng(self, size, device=None):
        raise NotImplementedError("wrap counts are only needed by three or more parties; two parties truncate locally")
