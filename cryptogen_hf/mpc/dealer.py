"""The trusted dealer process (dealer="ttp"): its tuple provider and its loop.

Same cryptography as CrypTen's ``TrustedThirdParty`` / ``TTPServer``: the
dealer shares one PRG seed with each party, so each party draws its own share
of every tuple (a, b, and for one party c) locally, and only the server
(rank 0) needs a message from the dealer: its share of c, i.e. c minus the
other parties' PRG shares. Neither party ever holds a whole tuple.

What differs is the wire protocol, because the dealer sits on the critical
path of every multiplication and comparison. CrypTen's request is a pickled
object (``send_obj``: a length, then the bytes), answered by a pickled size
(``recv_obj``: two more messages) and a ``broadcast``: five messages per
tuple. Here the server sends ONE fixed-size int64 request (what and which
shapes) and receives ONE tensor, whose shape it already knows. On this
2-core machine that halved the dealer's share of a GPT-2-base softmax
(scripts/bench_kernels.py, [ttp] rows).

The dealer's randomness is CrypTen's (``TTPServer._setup_generators`` and its
``additive``/``square``/``binary``/``wraps``/``B2A`` methods are reused as
they are), so the tuples are exactly those CrypTen's TTP would make.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cryptogen_hf.crypten_compat import import_crypten

crypten = import_crypten()
import crypten.communicator as comm  # noqa: E402  (after the shim)
from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element  # noqa: E402
from crypten.config import cfg  # noqa: E402
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor  # noqa: E402
from crypten.mpc.provider.provider import TupleProvider  # noqa: E402
from crypten.mpc.provider.ttp_provider import TTPClient, TTPServer  # noqa: E402

PROVIDER_NAME = "CRYPTOGEN_TTP"

# Request layout: [function, op, ndim0, size0 (MAX_DIMS), ndim1, size1 (MAX_DIMS)].
MAX_DIMS = 8
_REQUEST_LEN = 2 + 2 * (1 + MAX_DIMS)
_FUNCTIONS = ("additive", "square", "binary", "wraps", "B2A")
_TERMINATE = -1
# Products CrypTen asks triples for in the ops we run (matmul for attention
# and linear layers on shares, mul for everything elementwise).
_OPS = ("mul", "matmul")


def _encode_request(function: str, size0, size1=(), op: str = "mul") -> torch.Tensor:
    if function not in _FUNCTIONS or op not in _OPS:
        raise ValueError(f"dealer request: no tuples for {function}/torch.{op} (supported: {_FUNCTIONS}, ops {_OPS})")
    size0, size1 = tuple(size0), tuple(size1)
    if len(size0) > MAX_DIMS or len(size1) > MAX_DIMS:
        raise ValueError(f"dealer request: tensors of more than {MAX_DIMS} dims are not supported ({size0}, {size1})")
    req = torch.zeros(_REQUEST_LEN, dtype=torch.long)
    req[0] = _FUNCTIONS.index(function)
    req[1] = _OPS.index(op)
    req[2] = len(size0)
    req[3 : 3 + len(size0)] = torch.tensor(size0, dtype=torch.long)
    o = 3 + MAX_DIMS
    req[o] = len(size1)
    req[o + 1 : o + 1 + len(size1)] = torch.tensor(size1, dtype=torch.long)
    return req


def _decode_request(req: torch.Tensor) -> tuple[str, str, torch.Size, torch.Size]:
    vals = req.tolist()
    o = 3 + MAX_DIMS
    size0 = torch.Size(vals[3 : 3 + vals[2]])
    size1 = torch.Size(vals[o + 1 : o + 1 + vals[o]])
    return _FUNCTIONS[vals[0]], _OPS[vals[1]], size0, size1


def _result_size(function: str, op: str, size0, size1) -> torch.Size:
    """The shape of the dealer's reply, computed by the server without asking."""
    if function == "additive":
        meta = lambda s: torch.empty(s, device="meta")  # noqa: E731  (shapes only)
        return getattr(torch, op)(meta(size0), meta(size1)).size()
    if function == "binary":
        return torch.broadcast_shapes(size0, size1)
    return torch.Size(size0)


def _log_traffic(nelements: int) -> None:
    if cfg.communicator.verbose:
        comm.get()._log_communication(nelements)


def _request(function: str, size0, size1=(), op: str = "mul") -> torch.Tensor:
    """Server side: ask the dealer for its share of one tuple (two messages)."""
    ttp_rank = comm.get().get_ttp_rank()
    group = comm.get().ttp_group
    req = _encode_request(function, size0, size1, op)
    dist.send(req, ttp_rank, group=group)
    result = torch.empty(_result_size(function, op, torch.Size(size0), torch.Size(size1)), dtype=torch.long)
    dist.recv(result, ttp_rank, group=group)
    _log_traffic(req.nelement() + result.nelement())
    return result


def send_terminate() -> None:
    """Server side: tell the dealer the session is over (before crypten.uninit)."""
    req = torch.zeros(_REQUEST_LEN, dtype=torch.long)
    req[0] = _TERMINATE
    dist.send(req, comm.get().get_ttp_rank(), group=comm.get().ttp_group)


class DealerProcessProvider(TupleProvider):
    """The parties' side: each draws its shares from the PRG it shares with
    the dealer; the server (rank 0) asks the dealer for its share of c."""

    NAME = PROVIDER_NAME

    @staticmethod
    def _generator(device):
        return TTPClient.get().get_generator(device=device)

    @staticmethod
    def _is_server() -> bool:
        return comm.get().get_rank() == 0

    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if op not in _OPS or args or kwargs:
            raise ValueError(f"dealer: triples for torch.{op} with extra arguments are not supported")
        gen = self._generator(device)
        a = generate_random_ring_element(size0, generator=gen, device=device)
        b = generate_random_ring_element(size1, generator=gen, device=device)
        if self._is_server():
            c = _request("additive", size0, size1, op)
        else:
            c_size = _result_size("additive", op, torch.Size(size0), torch.Size(size1))
            c = generate_random_ring_element(c_size, generator=gen, device=device)
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))

    def square(self, size, device=None):
        gen = self._generator(device)
        r = generate_random_ring_element(size, generator=gen, device=device)
        r2 = _request("square", size) if self._is_server() else generate_random_ring_element(size, generator=gen, device=device)
        return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(r2, precision=0)

    def generate_binary_triple(self, size0, size1, device=None):
        gen = self._generator(device)
        a = generate_kbit_random_tensor(size0, generator=gen, device=device)
        b = generate_kbit_random_tensor(size1, generator=gen, device=device)
        if self._is_server():
            c = _request("binary", size0, size1)
        else:
            c = generate_kbit_random_tensor(torch.broadcast_shapes(a.size(), b.size()), generator=gen, device=device)
        return tuple(BinarySharedTensor.from_shares(t) for t in (a, b, c))

    def wrap_rng(self, size, device=None):
        gen = self._generator(device)
        r = generate_random_ring_element(size, generator=gen, device=device)
        theta = _request("wraps", size) if self._is_server() else generate_random_ring_element(size, generator=gen, device=device)
        return ArithmeticSharedTensor.from_shares(r, precision=0), ArithmeticSharedTensor.from_shares(theta, precision=0)

    def B2A_rng(self, size, device=None):
        gen = self._generator(device)
        rB = generate_kbit_random_tensor(size, bitlength=1, generator=gen, device=device)
        rA = _request("B2A", size) if self._is_server() else generate_random_ring_element(size, generator=gen, device=device)
        return ArithmeticSharedTensor.from_shares(rA, precision=0), BinarySharedTensor.from_shares(rB)

    @staticmethod
    def _init():
        TTPClient._init()  # receives the PRG seed from the dealer

    @staticmethod
    def uninit():
        TTPClient.uninit()


class _DealerLoop(TTPServer):
    """CrypTen's TTPServer tuple makers, served over the two-message protocol."""

    def __init__(self):  # noqa: D401  (TTPServer.__init__ would run CrypTen's loop)
        self.ttp_group = comm.get().ttp_group
        self.device = "cpu"  # read by TTPServer's PRSS helpers
        self._setup_generators()  # one PRG seed per party, as CrypTen's TTP

    def serve(self) -> None:
        """Answer requests until the server says terminate (or a party's socket closes)."""
        req = torch.empty(_REQUEST_LEN, dtype=torch.long)
        while True:
            dist.recv(req, 0, group=self.ttp_group)
            if int(req[0]) == _TERMINATE:
                return
            function, op, size0, size1 = _decode_request(req)
            if function == "additive":
                result = self.additive(size0, size1, op)
            elif function == "binary":
                result = self.binary(size0, size1)
            else:
                result = getattr(self, function)(size0)
            dist.send(result.contiguous(), 0, group=self.ttp_group)


def serve_dealer() -> None:
    """Body of the dealer process after it joined the process group."""
    _DealerLoop().serve()
