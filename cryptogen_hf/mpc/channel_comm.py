"""CrypTen's communicator for two parties over the session's own connection.

CrypTen's ``DistributedCommunicator`` needs torch.distributed: gloo sockets
and a rendezvous store, a second port that accepts anyone and carries shares
in the clear. :class:`ChannelCommunicator` implements the same interface for
exactly two parties on the framed :class:`~cryptogen_hf.protocol.transport.Channel`
(TLS in a session), as messages of kind ``"mpc"``: one connection carries
everything and nothing else listens.

Every tensor crosses as its raw bytes; the receiver knows the dtype and shape
it expects (both parties run the same program) and refuses a message of any
other size. Sends return once the bytes are with the kernel (the channel
reads the peer's messages meanwhile), so ``isend`` is a completed send and
``irecv`` is a receive deferred to ``wait()``; deferred receives complete in
the order they were posted, which is the order the peer sent them.

Opening to one party (``reduce``): the other party only sends its share; the
root alone receives and combines. Nothing else is ever sent on a rooted
operation, so a value opened to the client never reaches the server.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch.distributed import ReduceOp

from cryptogen_hf.crypten_compat import import_crypten

import_crypten()
from crypten.communicator.communicator import Communicator, _logging  # noqa: E402

from ..protocol.transport import MPC_KIND, Channel, ProtocolError  # noqa: E402

WORLD_SIZE = 2


class _Done:
    """What ``isend`` returns: the send has completed."""

    def wait(self):
        return True

    def is_completed(self):
        return True


class _DeferredRecv:
    """What ``irecv`` returns: ``wait()`` fills the tensor (after every earlier deferred receive)."""

    def __init__(self, comm: "ChannelCommunicator", tensor: torch.Tensor):
        self._comm, self.tensor, self._done = comm, tensor, False
        comm._deferred.append(self)

    def complete(self):
        if not self._done:
            self.tensor.copy_(self._comm._recv_like(self.tensor))
            self._done = True

    def wait(self):
        while not self._done:
            self._comm._deferred.pop(0).complete()
        return True

    def is_completed(self):
        return self._done


class ChannelCommunicator(Communicator):
    """CrypTen's communicator interface for ranks 0 and 1 over one Channel."""

    BYTES_PER_ELEMENT = 8

    def __init__(self, channel: Channel, rank: int):
        if rank not in (0, 1):
            raise ValueError(f"a two-party communicator has ranks 0 and 1, not {rank}")
        self.channel = channel
        self.rank = rank
        self.world_size = WORLD_SIZE
        self._name = f"rank{rank}"
        self._deferred: list[_DeferredRecv] = []
        self.ttp_initialized = False
        self.reset_communication_stats()

    # -- the two primitives everything else is made of ------------------------
    def _peer_of(self, rank: int | None) -> int:
        peer = 1 - self.rank
        if rank is not None and rank != peer:
            raise ValueError(f"rank {self.rank} can only talk to rank {peer}, not {rank}")
        return peer

    def _send_tensor(self, tensor: torch.Tensor) -> None:
        self._flush_deferred()
        self.channel.send(MPC_KIND, tensor.detach().contiguous().numpy().tobytes())

    def _recv_like(self, like: torch.Tensor) -> torch.Tensor:
        payload = self.channel.recv_payload(MPC_KIND)
        expected = like.numel() * like.element_size()
        if len(payload) != expected:
            raise ProtocolError(
                f"{self.channel.peer_name} sent a {len(payload)}-byte MPC message where a "
                f"{tuple(like.shape)} {like.dtype} tensor ({expected} bytes) was due"
            )
        return torch.from_numpy(np.frombuffer(payload, dtype=like.numpy().dtype).copy()).reshape(like.shape)

    def _flush_deferred(self) -> None:
        """Messages arrive in order: an earlier deferred receive is due before anything later."""
        while self._deferred:
            self._deferred.pop(0).complete()

    def _recv(self, like: torch.Tensor) -> torch.Tensor:
        self._flush_deferred()
        return self._recv_like(like)

    # -- byte messages (the two-party provider's HE and OT traffic) -----------
    def send_bytes(self, data: bytes, dst: int) -> None:
        self._peer_of(dst)
        self._flush_deferred()
        self.channel.send(MPC_KIND, data)

    def recv_bytes(self, src: int) -> bytes:
        self._peer_of(src)
        self._flush_deferred()
        return self.channel.recv_payload(MPC_KIND)

    # -- CrypTen's interface ---------------------------------------------------
    @_logging
    def send(self, tensor, dst):
        self._peer_of(dst)
        self._send_tensor(tensor)

    @_logging
    def recv(self, tensor, src=None):
        self._peer_of(src)
        return self._recv(tensor)

    @_logging
    def isend(self, tensor, dst):
        self._peer_of(dst)
        self._send_tensor(tensor)
        return _Done()

    @_logging
    def irecv(self, tensor, src=None):
        self._peer_of(src)
        return _DeferredRecv(self, tensor)

    @_logging
    def scatter(self, scatter_list, src, size=None, device=None):
        if src == self.rank:
            self._send_tensor(scatter_list[self._peer_of(None)])
            return scatter_list[self.rank]
        self._peer_of(src)
        like = torch.empty(size if size is not None else scatter_list[self.rank].size(), dtype=torch.long)
        return self._recv(like)

    @staticmethod
    def _combine(mine, theirs, op):
        if op == ReduceOp.SUM:
            return mine + theirs  # int64 wraps mod 2**64, the ring
        if op == ReduceOp.BXOR:
            return torch.bitwise_xor(mine, theirs)
        raise ValueError(f"two-party reduce supports SUM and BXOR, not {op}")

    @_logging
    def reduce(self, input, dst, op=ReduceOp.SUM, batched=False):
        """Open to ``dst`` only: the other party sends its share(s), the root combines."""
        tensors = list(input) if batched else [input]
        if self.rank != dst:
            self._peer_of(dst)
            for t in tensors:
                self._send_tensor(t)
            return None
        results = [self._combine(t, self._recv(t), op) for t in tensors]
        return results if batched else results[0]

    @_logging
    def all_reduce(self, input, op=ReduceOp.SUM, batched=False):
        tensors = list(input) if batched else [input]
        for t in tensors:  # every send first: one round for the whole batch
            self._send_tensor(t)
        results = [self._combine(t, self._recv(t), op) for t in tensors]
        return results if batched else results[0]

    @_logging
    def gather(self, tensor, dst):
        if self.rank != dst:
            self._peer_of(dst)
            self._send_tensor(tensor)
            return [None]
        theirs = self._recv(tensor)
        return [tensor, theirs] if self.rank == 0 else [theirs, tensor]

    @_logging
    def all_gather(self, tensor):
        self._send_tensor(tensor)
        theirs = self._recv(tensor)
        return [tensor, theirs] if self.rank == 0 else [theirs, tensor]

    @_logging
    def broadcast(self, input, src, group=None, batched=False):
        tensors = list(input) if batched else [input]
        if src == self.rank:
            for t in tensors:
                self._send_tensor(t)
        else:
            self._peer_of(src)
            for t in tensors:
                t.data.copy_(self._recv(t))
        return input

    @_logging
    def barrier(self):
        self._send_tensor(torch.zeros(0, dtype=torch.long))
        self._recv(torch.zeros(0, dtype=torch.long))

    def broadcast_obj(self, obj, src, group=None):
        """Sizes only (what CrypTen broadcasts when sharing a tensor of a size
        the other party does not know): sent as JSON, never unpickled."""
        if src == self.rank:
            if not isinstance(obj, (torch.Size, tuple, list, int)):
                raise TypeError(f"broadcast_obj over the session channel carries sizes and ints, not {type(obj).__name__}")
            self.send_bytes(json.dumps(list(obj) if not isinstance(obj, int) else obj).encode(), self._peer_of(None))
            return obj
        value = json.loads(self.recv_bytes(src))
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return torch.Size(value)
        if isinstance(value, int):
            return value
        raise ProtocolError(f"{self.channel.peer_name} broadcast {value!r} where a size was due")

    def send_obj(self, obj, dst, group=None):
        raise NotImplementedError("pickled objects are not sent between the parties (only the TTP dealer uses them)")

    def recv_obj(self, src, group=None):
        raise NotImplementedError("pickled objects are not received from the peer (only the TTP dealer uses them)")

    def get_world_size(self):
        return self.world_size

    def get_rank(self):
        return self.rank

    def get_ttp_rank(self):
        return self.world_size

    def set_name(self, name):
        self._name = name

    def get_name(self):
        return self._name

    def get_distributed_backend(self):
        return "cryptogen-channel"
