"""Correlated randomness made by the two parties alone (``dealer: none``).

CrypTen's protocols consume Beaver triples (``a, b, c = a*b``), square pairs,
binary AND triples and B2A bits. Two sources:

- AND triples (most of a token's correlations: every comparison is a carry
  tree of AND gates) come from random OTs by IKNP extension, one in each
  direction per triple (:mod:`cryptogen_hf.mpc.ot`); its base OTs are made
  once per session from one HE cross product. 0.5 us per triple instead of
  3.7 us by HE.
- Arithmetic triples, squares and B2A bits: each party draws its own share
  of every random operand from its private AES-CTR generator, and the one
  term neither can compute alone, the cross product ``x_server * y_client +
  x_client * y_server``, comes from :mod:`cryptogen_hf.he.ole` (the client's
  BFV keys, re-randomised and noise-flooded replies). Per request, two
  messages:

    client -> server   Enc(x_client), Enc(y_client)
    server -> client   Enc(cross + R)          (server keeps -R)

What each party sees: the server sees ciphertexts under a key it does not
hold; the client sees cross + R with R uniform over a range 2**40 or more
times wider than the cross term, and noise flooded to the same margin. So
neither learns anything about the other's shares, hence about any value
opened with them.

Batches: one HE exchange costs about the same for 1 or 8192 values (a
ciphertext has 8192 slots), an OT batch costs one round, and a token asks
for hundreds of small tuples. So elementwise triples, squares, AND triples
and B2A bits are made in batches (:data:`BATCH`) into per-kind pools, one batch
of each at session set-up and the next whenever a pool runs dry, and each
request takes the next unused values: every value is used once. A request
with broadcasting (a of shape (n, 1) times b of shape (n, d)) gets a triple
of the broadcast shape: CrypTen's Beaver step then masks the broadcast copy
of x with independent values, which hides it as well. Both parties make the
same requests in the same order (SPMD), so their pools stay in step.
Matmul triples (unused by the protocol) are made per request.
"""

from __future__ import annotations

import struct
import time

import numpy as np
import torch

from cryptogen_hf.crypten_compat import import_crypten

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402  (after the shim)
from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element  # noqa: E402
from crypten.config import cfg  # noqa: E402
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor  # noqa: E402
from crypten.mpc.provider.provider import TupleProvider  # noqa: E402

from ..he.ole import OLEClient, OLEServer, chunk_bounds  # noqa: E402
from .ot import KAPPA, LIMBS, OTExtensionReceiver, OTExtensionSender, and_triples_from_ots, limbs_to_seeds, seeds_to_limbs  # noqa: E402
from .prg import SEED_BYTES  # noqa: E402

PROVIDER_NAME = "CRYPTOGEN_TWO_PARTY"
SERVER_RANK, CLIENT_RANK = 0, 1  # as in runtime (which imports this module)
# Largest message the receiver accepts (a malformed length must not make it
# allocate gigabytes). The largest real one is one chunk of the client's
# request: 2 operands x 4 primes of seeded ciphertexts, ~1.6 MB (the session's
# public keys, sent once, are ~1.7 MB).
MAX_MESSAGE_BYTES = 16 << 20


class CorrelationError(RuntimeError):
    """A correlated-randomness message was malformed or too large."""


# ---------------------------------------------------------------------------
# Messages: a list of byte strings as one length-prefixed message
# ---------------------------------------------------------------------------
def pack_message(blobs: list[bytes]) -> bytes:
    return struct.pack(f"<Q{len(blobs)}Q", len(blobs), *map(len, blobs)) + b"".join(blobs)


def unpack_message(data: bytes) -> list[bytes]:
    """The parts of a message; CorrelationError if its framing is inconsistent."""
    if len(data) < 8:
        raise CorrelationError(f"correlated-randomness message of {len(data)} bytes is too short")
    (count,) = struct.unpack_from("<Q", data, 0)
    if 8 + 8 * count > len(data):
        raise CorrelationError(f"correlated-randomness message announces {count} parts in {len(data)} bytes")
    lengths = struct.unpack_from(f"<{count}Q", data, 8)
    offset = 8 + 8 * count
    if offset + sum(lengths) != len(data):
        raise CorrelationError("correlated-randomness message: part lengths do not add up to its size")
    blobs = []
    for length in lengths:
        blobs.append(data[offset : offset + length])
        offset += length
    return blobs


def _send_blobs(blobs: list[bytes], dst: int) -> None:
    """One message on the session channel; returns once it is with the kernel
    (the channel reads the peer's messages meanwhile, so both may send at once)."""
    payload = pack_message(blobs)
    _log_traffic(len(payload))
    comm.get().send_bytes(payload, dst)


def _recv_blobs(src: int) -> list[bytes]:
    payload = comm.get().recv_bytes(src)
    if not 8 <= len(payload) <= MAX_MESSAGE_BYTES:
        raise CorrelationError(f"correlated-randomness message of {len(payload)} bytes (limit {MAX_MESSAGE_BYTES})")
    _log_traffic(len(payload))
    return unpack_message(payload)


def _log_traffic(n_bytes: int) -> None:
    if cfg.communicator.verbose:
        comm.get()._log_communication(-(-n_bytes // 8))  # CrypTen counts 8-byte elements


def _as_u64(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).numpy().view(np.uint64)


# Values made per refill of each pool: whole ciphertexts of 8192 slots for the
# HE-made kinds; for AND triple words (64 triples each, by OT extension),
# 2**19 triples, whose OT message (16 bytes per OT) is 8 MiB.
BATCH = {"mul": 4 * 8192, "square": 8192, "binary": 2**19 // 64, "b2a": 8192}


class _Pool:
    """Unused correlated values of one kind, as flat int64 tensors."""

    def __init__(self, make, batch: int):
        self._make = make  # n -> tuple of flat tensors of n values
        self.batch = batch
        self._parts: tuple | None = None
        self._used = 0
        self.taken = 0  # values handed out so far (both parties count the same)

    @property
    def available(self) -> int:
        return 0 if self._parts is None else self._parts[0].numel() - self._used

    def reserve(self, n: int) -> None:
        """Make sure n unused values are ready, making at least a batch if any are missing."""
        have = self.available
        if have >= n:
            return
        fresh = self._make(max(self.batch, n - have))
        if have:
            fresh = tuple(torch.cat([old[self._used :], new]) for old, new in zip(self._parts, fresh))
        self._parts, self._used = fresh, 0

    def take(self, n: int) -> tuple:
        self.reserve(n)
        out = tuple(part[self._used : self._used + n] for part in self._parts)
        self._used += n
        self.taken += n
        return out


class TwoPartyProvider(TupleProvider):
    """CrypTen tuple provider for two parties and no dealer."""

    NAME = PROVIDER_NAME

    def __init__(self):
        super().__init__()
        self._client: OLEClient | None = None
        self._server: OLEServer | None = None
        self._peer: int | None = None
        self._ot_sender: OTExtensionSender | None = None
        self._ot_receiver: OTExtensionReceiver | None = None
        self._pools = {
            "mul": _Pool(self._make_triples, BATCH["mul"]),
            "square": _Pool(self._make_squares, BATCH["square"]),
            "binary": _Pool(self._make_binary_triples, BATCH["binary"]),
            "b2a": _Pool(self._make_b2a_bits, BATCH["b2a"]),
        }
        self.stats = {"seconds": 0.0, "requests": 0, "arithmetic": 0, "and_bits": 0, "b2a_bits": 0}

    # -- session set-up: the client's cross-product public keys, first batches ---
    def setup(self, rank: int) -> None:
        """Exchange the keys, run the base OTs, then make one batch of every
        kind ahead of use (in the same order on both sides), so the first
        token does not wait for them."""
        start = time.perf_counter()
        self._peer = SERVER_RANK if rank == CLIENT_RANK else CLIENT_RANK
        if rank == CLIENT_RANK:
            self._client = OLEClient()
            _send_blobs(self._client.public_keys(), SERVER_RANK)
        else:
            self._server = OLEServer(_recv_blobs(CLIENT_RANK))
        self._setup_ot_extension(rank)
        for pool in self._pools.values():
            pool.reserve(pool.batch)
        self.stats["setup_seconds"] = time.perf_counter() - start

    # -- ahead of use -------------------------------------------------------------
    def consumption(self) -> dict[str, int]:
        """Values of each kind handed out so far (equal on both sides: SPMD)."""
        return {kind: pool.taken for kind, pool in self._pools.items()}

    def prepare(self, counts: dict[str, int]) -> None:
        """Make sure `counts[kind]` unused values of each kind are ready. Both
        parties call it with the same counts, at the same point."""
        start = time.perf_counter()
        for kind, pool in self._pools.items():
            pool.reserve(int(counts.get(kind, 0)))
        self.stats["prepare_seconds"] = self.stats.get("prepare_seconds", 0.0) + time.perf_counter() - start

    def _setup_ot_extension(self, rank: int) -> None:
        """KAPPA base OTs in each direction, from one HE cross product (see
        :mod:`cryptogen_hf.mpc.ot`). Each party is the extension sender in
        one direction (base-OT receiver: random bits s) and the extension
        receiver in the other (base-OT sender: seed pairs k0, k1). Block d of
        the cross product holds the base OTs whose receiver is rank d:
        shares of s_i * (k1_i - k0_i), per 64-bit limb of the seeds. The base
        sender then sends w = k0 + its share, and the receiver adds its own
        share: k0 + s (k1 - k0) = k_s. The receiver's share is masked by the
        cross product's R, so w tells it k_s and nothing about k_(1-s)."""
        prg = self._local_prg()
        s_bits = np.frombuffer(prg.random_bytes(KAPPA), dtype=np.uint8) & 1
        seeds0, seeds1 = (np.frombuffer(prg.random_bytes(KAPPA * SEED_BYTES), dtype=np.uint8).reshape(KAPPA, SEED_BYTES) for _ in range(2))
        k0 = seeds_to_limbs(seeds0)
        delta = seeds_to_limbs(seeds1) - k0  # mod 2**64 per limb
        s_limbs = np.repeat(s_bits.astype(np.uint64), LIMBS).reshape(KAPPA, LIMBS)
        zeros = np.zeros_like(delta)
        as_receiver, as_sender = (s_limbs, zeros), (zeros, delta)
        x = np.stack([as_receiver[0], as_sender[0]] if rank == SERVER_RANK else [as_sender[0], as_receiver[0]])
        y = np.stack([as_receiver[1], as_sender[1]] if rank == SERVER_RANK else [as_sender[1], as_receiver[1]])
        share = self._cross(torch.from_numpy(x.view(np.int64)), torch.from_numpy(y.view(np.int64)), wide=True)
        share = share.numpy().view(np.uint64)
        receiver_block, sender_block = rank, 1 - rank
        _send_blobs([(k0 + share[sender_block]).tobytes()], self._peer)
        (w,) = _recv_blobs(self._peer)
        if len(w) != KAPPA * SEED_BYTES:
            raise CorrelationError(f"base-OT message of {len(w)} bytes, expected {KAPPA * SEED_BYTES}")
        chosen = limbs_to_seeds(np.frombuffer(w, dtype="<u8").reshape(KAPPA, LIMBS) + share[receiver_block])
        self._ot_sender = OTExtensionSender(s_bits, chosen)
        self._ot_receiver = OTExtensionReceiver(seeds0, seeds1, prg)

    def _local_prg(self):
        return crypten.generators["local"][torch.device("cpu")]

    # -- the one HE exchange --------------------------------------------------
    def _cross(self, x: torch.Tensor, y: torch.Tensor, wide: bool) -> torch.Tensor:
        """This party's share (int64, mod 2**64) of x_server*y_client + x_client*y_server,
        elementwise; x and y are this party's own values (same shape).

        One exchange per chunk of N slots, the client's all sent first: the server
        evaluates chunk c while the client encrypts chunk c + 1 and decrypts
        chunk c - 1, so the two processes work at the same time."""
        if x.shape != y.shape:
            raise ValueError(f"cross product of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.long)
        start = time.perf_counter()
        xs, ys = _as_u64(x), _as_u64(y)
        chunks = chunk_bounds(xs.size)
        share = np.empty(xs.size, dtype=np.uint64)
        if self._client is not None:
            for lo, hi in chunks:
                _send_blobs(self._client.encrypt(xs[lo:hi], ys[lo:hi], wide), SERVER_RANK)
            for lo, hi in chunks:
                share[lo:hi] = self._client.decrypt(_recv_blobs(SERVER_RANK), hi - lo, wide)
        elif self._server is not None:
            for lo, hi in chunks:
                replies, share[lo:hi] = self._server.evaluate(_recv_blobs(CLIENT_RANK), xs[lo:hi], ys[lo:hi], wide, self._local_prg())
                _send_blobs(replies, CLIENT_RANK)
        else:
            raise RuntimeError("two-party correlations used before setup() (no HE keys exchanged)")
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["requests"] += 1
        return torch.from_numpy(share.view(np.int64).copy()).reshape(x.shape)

    # -- batches: every value drawn from this party's own AES-CTR generator -------
    def _make_triples(self, n: int) -> tuple:
        a, b = generate_random_ring_element((n,)), generate_random_ring_element((n,))
        self.stats["arithmetic"] += n
        return a, b, a * b + self._cross(a, b, wide=True)

    def _make_squares(self, n: int) -> tuple:
        r = generate_random_ring_element((n,))
        self.stats["arithmetic"] += n
        return r, r * r + self._cross(r, r, wide=True)  # r0 r1 + r1 r0

    def _make_binary_triples(self, n_words: int) -> tuple:
        """AND triples from random OTs, one in each direction per triple (both
        parties send their extension message at once: one round per batch)."""
        if self._ot_sender is None or self._ot_receiver is None:
            raise RuntimeError("two-party correlations used before setup() (no base OTs)")
        start = time.perf_counter()
        parts = []
        for lo in range(0, n_words, BATCH["binary"]):  # messages of at most 8 MiB
            m = 64 * (min(n_words, lo + BATCH["binary"]) - lo)
            u, r, m_r = self._ot_receiver.extend(m)
            _send_blobs([u], self._peer)
            (u_peer,) = _recv_blobs(self._peer)
            sent = self._ot_sender.extend(u_peer, m)
            parts.append(and_triples_from_ots(sent, (r, m_r)))
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["and_bits"] += 64 * n_words
        return tuple(torch.from_numpy(np.packbits(np.concatenate(bits), bitorder="little").view("<i8").copy()) for bits in zip(*parts))

    def _make_b2a_bits(self, n: int) -> tuple:
        r = generate_kbit_random_tensor((n,), bitlength=1)
        self.stats["b2a_bits"] += n
        # r = r0 XOR r1 = r0 + r1 - 2 r0 r1; the cross product gives shares of 2 r0 r1.
        return r - self._cross(r, r, wide=False), r

    # -- CrypTen's TupleProvider interface ---------------------------------------
    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if args or kwargs:
            raise ValueError(f"two-party triples for torch.{op} with extra arguments are not supported")
        if op == "mul":
            shape = torch.broadcast_shapes(torch.Size(size0), torch.Size(size1))
            a, b, c = (t.reshape(shape) for t in self._pools["mul"].take(shape.numel()))
        elif op == "matmul":
            a, b = generate_random_ring_element(size0), generate_random_ring_element(size1)
            if a.dim() < 2 or b.dim() < 2:
                raise ValueError("two-party matmul triples need operands of at least 2 dims")
            # (..., I, K) x (..., K, J): the elementwise triple of every a_ik b_kj, summed over k.
            left, right = a.unsqueeze(-1), b.unsqueeze(-3)
            shape = torch.broadcast_shapes(left.shape, right.shape)
            cross = self._cross(left.expand(shape), right.expand(shape), wide=True).sum(-2)
            self.stats["arithmetic"] += shape.numel()
            c = torch.matmul(a, b) + cross
        else:
            raise ValueError(f"two-party triples: torch.{op} is not supported (mul, matmul)")
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))

    def square(self, size, device=None):
        size = torch.Size(size)
        r, r2 = (t.reshape(size) for t in self._pools["square"].take(size.numel()))
        return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(r2, precision=0)

    def generate_binary_triple(self, size0, size1, device=None):
        shape = torch.broadcast_shapes(torch.Size(size0), torch.Size(size1))
        return tuple(BinarySharedTensor.from_shares(t.reshape(shape)) for t in self._pools["binary"].take(shape.numel()))

    def B2A_rng(self, size, device=None):
        size = torch.Size(size)
        r_arith, r = (t.reshape(size) for t in self._pools["b2a"].take(size.numel()))
        return ArithmeticSharedTensor.from_shares(r_arith, precision=0), BinarySharedTensor.from_shares(r)

    def wrap_rng(self, size, device=None):
        raise NotImplementedError("wrap counts are only needed by three or more parties; two parties truncate locally")
