"""Process runtime for the MPC half of CryptoGen: who is which CrypTen rank,
how the parties meet, which dealer makes the correlated randomness, and how a
dead or silent peer turns into an exception instead of a hang.

Parties and ranks (the ONLY place this mapping lives)
-----------------------------------------------------
- ``"server"`` (model owner)  -> CrypTen rank 0, always.
- ``"client"`` (prompt owner) -> CrypTen rank 1, always.
- ``"dealer"``                -> rank 2, only in ``dealer="ttp"`` mode.

Code elsewhere must use :func:`rank_of` (e.g. ``crypten.cryptensor(x,
src=rank_of("client"))``) and never hard-code ranks.

Dealer modes
------------
``dealer="none"`` (default): two processes and nobody else. Every party
draws its shares from its own AES-CTR generator and the cross terms of the
triples come from HE between the two (:mod:`cryptogen_hf.mpc.two_party`):
the provider is set up in :func:`init_party`, right after the PRG seeds.

``dealer="ttp"``: a third OS process (:func:`run_dealer`) deals the tuples at
rank ``world_size`` = 2, which is where CrypTen's communicator puts the TTP
(``get_ttp_rank() == world_size``). CrypTen's TrustedThirdParty construction
with a leaner wire protocol (:mod:`cryptogen_hf.mpc.dealer`). Sessions refuse
it (a dealer must run on a host neither party controls, and there is no such
service yet); :func:`launch_local` uses it for three-process benchmarks.

``dealer="client"``: the client makes all triples (:class:`ClientDealerProvider`,
CrypTen's TFP logic with the dealer rank as a parameter, so ranks stay
server=0, client=1 in every mode). The client then knows every triple and so
every value opened in a multiplication: every activation. Sessions allow it
only with ``mpc.client_sees_activations: true`` on both sides.

Connections and timeouts
------------------------
Two parties (``dealer`` "none" or "client", every session): CrypTen's
communicator is :class:`~cryptogen_hf.mpc.channel_comm.ChannelCommunicator`
on the session's own framed channel (TLS in a session; a socket pair in
:func:`launch_local`), so the MPC opens no port of its own and every
receive has the channel's timeout. A dead peer closes the connection, which
the channel reports at once; a silent one is caught by the timeout; either
way :func:`translate_peer_error` turns it into a :class:`PeerError` naming
the role that went away.

TTP mode (three processes, benchmarks only): gloo with a rendezvous on
``MPCConfig.host:port``. CrypTen's ``DistributedCommunicator.__init__``
calls ``torch.distributed.init_process_group`` and ``new_group`` WITHOUT a
timeout (torch's default is 30 minutes), so we construct the communicator
ourselves (:class:`_TimedCommunicator`, same fields as CrypTen's, plus
``timeout=``) for the default group and every subgroup. The dealer uses
``MPCConfig.dealer_idle_timeout_s`` (default 1 hour) because it
legitimately waits while the parties do long HE work between triple
requests; it still exits at once when a party's socket closes.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from cryptogen_hf.crypten_compat import import_crypten

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Roles and ranks: the one place where this mapping is defined.
# --------------------------------------------------------------------------
SERVER = "server"
CLIENT = "client"
DEALER = "dealer"
PARTY_ROLES = (SERVER, CLIENT)
_PARTY_RANKS = {SERVER: 0, CLIENT: 1}
WORLD_SIZE = 2  # the number of computing parties; the TTP dealer is extra
# "none": the two parties make every correlation themselves (mpc/two_party.py), the default;
# "ttp": a third process deals them; "client": the client deals (it then sees every activation).
DEALER_MODES = ("none", "ttp", "client")

# Name under which ClientDealerProvider is registered in CrypTen's config.
_CLIENT_DEALER_PROVIDER = "CRYPTOGEN_CLIENT_DEALER"


def rank_of(role: str) -> int:
    """CrypTen rank of a role ("server" -> 0, "client" -> 1, "dealer" -> 2)."""
    if role == DEALER:
        return WORLD_SIZE  # CrypTen puts the TTP at rank == world_size
    try:
        return _PARTY_RANKS[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; expected one of {PARTY_ROLES + (DEALER,)}")


def role_of(rank: int) -> str:
    """Inverse of :func:`rank_of`."""
    for role in PARTY_ROLES + (DEALER,):
        if rank_of(role) == rank:
            return role
    raise ValueError(f"no role has rank {rank}")


@dataclasses.dataclass(frozen=True)
class MPCConfig:
    """How the parties meet. Must be identical in every process of a session.

    dealer: "none" (the two parties make the triples with HE, default), "ttp"
        (a third process deals them) or "client" (the client deals: it then
        sees every activation, so the weights are as good as public).
    host, port: TTP mode only: gloo's TCP rendezvous (hosted by rank 0).
        port=0 is allowed only with :func:`launch_local`, which picks a free
        port. Two parties run over their channel and use neither.
    timeout_s: limit on every blocking send/recv/collective between parties.
    dealer_idle_timeout_s: the dealer's limit while waiting for the next
        request (the parties may do long HE work between requests).
    torch_threads: intra-op threads per process (None: leave torch's default).
    """

    dealer: str = "none"
    host: str = "127.0.0.1"
    port: int = 0
    timeout_s: float = 60.0
    dealer_idle_timeout_s: float = 3600.0
    torch_threads: int | None = 1

    def __post_init__(self):
        if self.dealer not in DEALER_MODES:
            raise ValueError(f"dealer must be one of {DEALER_MODES}, got {self.dealer!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    @property
    def uses_ttp(self) -> bool:
        return self.dealer == "ttp"

    @property
    def total_processes(self) -> int:
        return WORLD_SIZE + (1 if self.uses_ttp else 0)


class PeerError(RuntimeError):
    """A peer process died, closed its connection or did not answer in time."""


class MPCLaunchError(RuntimeError):
    """launch_local: a party failed; the message holds each child's traceback.

    ``results``: return values of the roles that finished;
    ``failures``: role -> failure text (with traceback where there is one).
    """

    def __init__(self, message, results=None, failures=None):
        super().__init__(message)
        self.results = dict(results or {})
        self.failures = dict(failures or {})


# --------------------------------------------------------------------------
# The client-as-dealer provider.
# --------------------------------------------------------------------------
def _make_client_dealer_provider(dealer_rank: int):
    """Build a TupleProvider in which `dealer_rank` makes every tuple.

    Same construction as CrypTen's TrustedFirstParty (which fixes the dealer
    at rank 0), written with the dealer as a parameter. The dealer draws from
    CrypTen's "local" generator (seeded from os.urandom in crypten's PRG
    setup), so the other party cannot predict the tuples. Sharing a value from
    `src` is free in CrypTen (pseudo-random zero shares), so a tuple costs no
    communication except the scatter in wrap_rng.
    """
    crypten = import_crypten()
    import crypten.communicator as comm
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element
    from crypten.common.util import count_wraps
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
    from crypten.mpc.provider.provider import TupleProvider

    def is_dealer():
        return comm.get().get_rank() == dealer_rank

    def dealer_value(make, size, device):
        # Non-dealers only need a correctly-shaped placeholder: their share
        # is produced by the zero-sharing inside ArithmeticSharedTensor.
        if is_dealer():
            return make()
        return torch.zeros(size, dtype=torch.long, device=device)

    class ClientDealerProvider(TupleProvider):
        NAME = "CLIENT_DEALER"

        def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
            if is_dealer():
                a = generate_random_ring_element(size0, device=device)
                b = generate_random_ring_element(size1, device=device)
                c = getattr(torch, op)(a, b, *args, **kwargs)
            else:
                a = torch.zeros(size0, dtype=torch.long, device=device)
                b = torch.zeros(size1, dtype=torch.long, device=device)
                c = getattr(torch, op)(a, b, *args, **kwargs)  # shape only
            return (
                ArithmeticSharedTensor(a, precision=0, src=dealer_rank),
                ArithmeticSharedTensor(b, precision=0, src=dealer_rank),
                ArithmeticSharedTensor(c, precision=0, src=dealer_rank),
            )

        def square(self, size, device=None):
            r = dealer_value(lambda: generate_random_ring_element(size, device=device), size, device)
            r2 = r.mul(r)
            return (
                ArithmeticSharedTensor(r, precision=0, src=dealer_rank),
                ArithmeticSharedTensor(r2, precision=0, src=dealer_rank),
            )

        def generate_binary_triple(self, size0, size1, device=None):
            if is_dealer():
                a = generate_kbit_random_tensor(size0, device=device)
                b = generate_kbit_random_tensor(size1, device=device)
            else:
                a = torch.zeros(size0, dtype=torch.long, device=device)
                b = torch.zeros(size1, dtype=torch.long, device=device)
            c = a & b
            return (
                BinarySharedTensor(a, src=dealer_rank),
                BinarySharedTensor(b, src=dealer_rank),
                BinarySharedTensor(c, src=dealer_rank),
            )

        def wrap_rng(self, size, device=None):
            # The dealer picks every party's share of r, counts the wraps of
            # their sum and scatters the shares (one message).
            n = comm.get().get_world_size()
            if is_dealer():
                r = [generate_random_ring_element(size, device=device) for _ in range(n)]
                theta_r = count_wraps(r)
            else:
                r = [torch.zeros(size, dtype=torch.long, device=device) for _ in range(n)]
                theta_r = torch.zeros(size, dtype=torch.long, device=device)
            share = comm.get().scatter(r, dealer_rank, size=torch.Size(size), device=device)
            return (
                ArithmeticSharedTensor.from_shares(share, precision=0),
                ArithmeticSharedTensor(theta_r, precision=0, src=dealer_rank),
            )

        def B2A_rng(self, size, device=None):
            r = dealer_value(
                lambda: generate_kbit_random_tensor(size, bitlength=1, device=device), size, device
            )
            return (
                ArithmeticSharedTensor(r, precision=0, src=dealer_rank),
                BinarySharedTensor(r, src=dealer_rank),
            )

    del crypten  # only imported to apply the torch shim first
    return ClientDealerProvider()


def _select_provider(config: MPCConfig) -> None:
    """Point CrypTen's (process-global) config at the dealer's provider."""
    crypten = import_crypten()
    from crypten.config import cfg

    providers = vars(crypten.mpc)["__SUPPORTED_PROVIDERS"]
    if config.dealer == "none":
        from . import two_party

        # A fresh provider per session: it holds this session's HE keys.
        providers[two_party.PROVIDER_NAME] = two_party.TwoPartyProvider()
        cfg.mpc.provider = two_party.PROVIDER_NAME
    elif config.uses_ttp:
        from . import dealer

        if dealer.PROVIDER_NAME not in providers:
            providers[dealer.PROVIDER_NAME] = dealer.DealerProcessProvider()
        cfg.mpc.provider = dealer.PROVIDER_NAME
    else:
        # crypten.mpc keeps its providers in a module-level dict that
        # get_default_provider() indexes with cfg.mpc.provider.
        if _CLIENT_DEALER_PROVIDER not in providers:
            providers[_CLIENT_DEALER_PROVIDER] = _make_client_dealer_provider(rank_of(CLIENT))
        cfg.mpc.provider = _CLIENT_DEALER_PROVIDER


# --------------------------------------------------------------------------
# A CrypTen communicator whose process groups honour a timeout.
# --------------------------------------------------------------------------
def _timed_communicator_class():
    import_crypten()
    from crypten.communicator import DistributedCommunicator
    from crypten.communicator.communicator import _logging

    class _TimedCommunicator(DistributedCommunicator):
        """CrypTen's DistributedCommunicator, built with explicit arguments and
        with `timeout` on init_process_group and on every subgroup (CrypTen
        passes none, so torch would wait 30 minutes)."""

        def __init__(self, *, rank, world_size, init_ttp, rendezvous, timeout):
            # Same attributes that CrypTen's constructor sets.
            self.distributed_backend = "gloo"
            self.rendezvous = rendezvous
            self.world_size = world_size
            self.rank = rank
            self.reset_communication_stats()
            self._name = f"rank{rank}"
            total = world_size + 1 if init_ttp else world_size
            dist.init_process_group(
                backend="gloo",
                init_method=rendezvous,
                world_size=total,
                rank=rank,
                timeout=timeout,
            )
            # Subgroups get their own timeout in torch (not the default
            # group's), so pass it every time. Every rank must create every
            # group, members or not, in the same order.
            self.ttp_group = dist.new_group(list(range(total)), timeout=timeout)
            if total > 1:
                self.ttp_comm_group = dist.new_group([0, total - 1], timeout=timeout)
            self.main_group = dist.new_group(list(range(world_size)), timeout=timeout)
            self.ttp_initialized = init_ttp

        @_logging
        def reduce(self, input, dst, op=dist.ReduceOp.SUM, batched=False):
            """Open shares to ``dst`` only, with point-to-point messages.

            CrypTen reveals a value to one party (``reveal(dst=...)``) with
            ``torch.distributed.reduce``, and gloo's reduce is a reduce-scatter
            followed by a gather: the ranks that are not the root receive the
            other's share of part of the tensor, and hold the opened values in
            their buffer afterwards (half of a long tensor, all of one with one
            or two elements). The server would see half of every logits row and
            every token opened in ``reveal: token`` mode. Here the other ranks
            only send their share; the root alone receives and combines.
            """
            if op not in (dist.ReduceOp.SUM, dist.ReduceOp.BXOR):
                raise ValueError(f"reduce to one party supports SUM and BXOR, not {op}")
            tensors = list(input) if batched else [input]
            if self.get_rank() != dst:
                for t in tensors:
                    dist.send(t.data.contiguous(), dst, group=self.main_group)
                return None
            combine = torch.add if op == dist.ReduceOp.SUM else torch.bitwise_xor
            results = [t.clone() for t in tensors]
            for src in range(self.world_size):
                if src != dst:
                    for i, mine in enumerate(results):
                        theirs = torch.empty_like(mine)
                        dist.recv(theirs, src, group=self.main_group)
                        results[i] = combine(mine, theirs)
            return results if batched else results[0]

    return _TimedCommunicator


# Per-process state of this module (each party is its own process).
_state: dict[str, Any] = {}


def _exchange_identities(role: str) -> dict[str, tuple[str, int]]:
    """Publish (hostname, pid) of this process in the rendezvous store and
    read the others', so that a later peer failure can name the dead peer."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"cryptogen/id/{role}", f"{socket.gethostname()}|{os.getpid()}")
    roles = list(PARTY_ROLES) + ([DEALER] if _state["config"].uses_ttp else [])
    ids = {}
    for other in roles:
        host, pid = store.get(f"cryptogen/id/{other}").decode().split("|")
        ids[other] = (host, int(pid))
    return ids


def _join(role: str, config: MPCConfig) -> None:
    crypten = import_crypten()
    from crypten.communicator import DistributedCommunicator

    if DistributedCommunicator.is_initialized():
        raise RuntimeError("this process already joined an MPC session; call shutdown() first")
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    _select_provider(config)
    _state.clear()
    _state.update(role=role, config=config)
    return crypten


def _connect_gloo(role: str, config: MPCConfig, timeout_s: float):
    """Three processes (TTP mode only): gloo with a rendezvous on ``config.port``."""
    if config.port == 0:
        raise ValueError("MPCConfig.port must be set (port=0 is only for launch_local)")
    crypten = _join(role, config)
    from crypten.communicator import DistributedCommunicator

    cls = _timed_communicator_class()
    DistributedCommunicator.instance = cls(
        rank=rank_of(role),
        world_size=WORLD_SIZE,
        init_ttp=config.uses_ttp,
        rendezvous=f"tcp://{config.host}:{config.port}",
        timeout=timedelta(seconds=timeout_s),
    )
    _state["peers"] = _exchange_identities(role)
    return crypten


def init_party(role: str, config: MPCConfig, channel=None) -> None:
    """Join the session as "server" or "client": install CrypTen's communicator,
    choose the dealer's provider, set up the PRGs (what crypten.init does).

    Two parties (dealer "none" or "client"): CrypTen runs over ``channel``,
    the session's own connection (:mod:`.channel_comm`); nothing else is
    opened. TTP mode (benchmarks only): gloo on ``config.host:config.port``."""
    if role not in PARTY_ROLES:
        raise ValueError(f"init_party: role must be one of {PARTY_ROLES}, got {role!r}")
    if config.uses_ttp:
        crypten = _connect_gloo(role, config, config.timeout_s)
    else:
        if channel is None:
            raise ValueError(f"dealer {config.dealer!r}: the two parties' MPC runs over their channel; pass channel=")
        crypten = _join(role, config)
        from crypten.communicator import DistributedCommunicator

        from .channel_comm import ChannelCommunicator

        DistributedCommunicator.instance = ChannelCommunicator(channel, rank_of(role))
    try:
        # The rest of crypten.init(): pairwise/global PRG seeds, TTP client.
        crypten._setup_prng()
        if config.uses_ttp:
            crypten.mpc.provider.ttp_provider.TTPClient._init()
        elif config.dealer == "none":
            correlation_provider().setup(rank_of(role))
    except RuntimeError as exc:
        raise translate_peer_error(exc) from exc


def run_dealer(config: MPCConfig) -> None:
    """Body of the TTP dealer process (dealer="ttp" only). Returns when the
    server sends CrypTen's "terminate" message or a party disconnects."""
    if not config.uses_ttp:
        raise ValueError("run_dealer is only for dealer='ttp'")
    _connect_gloo(DEALER, config, config.dealer_idle_timeout_s)
    from .dealer import serve_dealer

    try:
        serve_dealer()  # until the server's "terminate"
    except RuntimeError as exc:
        # A party closed its socket or stayed silent past the idle timeout:
        # the session is over either way (the parties report their own error).
        log.info("dealer: session ended: %s", exc)
    shutdown()


def shutdown() -> None:
    """Leave the session (the server also tells the TTP dealer to stop)."""
    crypten = import_crypten()
    from crypten.communicator import DistributedCommunicator

    if not DistributedCommunicator.is_initialized():
        return
    from .channel_comm import ChannelCommunicator

    if isinstance(DistributedCommunicator.instance, ChannelCommunicator):
        DistributedCommunicator.instance = None  # the channel belongs to the session, which closes it
        _state.clear()
        return
    try:
        if _state.get("config") is not None and _state["config"].uses_ttp and _state.get("role") != DEALER:
            from .dealer import send_terminate

            if _state.get("role") == SERVER:
                send_terminate()
            # CrypTen's own shutdown would send its pickled "terminate" too.
            DistributedCommunicator.instance.ttp_initialized = False
            crypten.mpc.provider.ttp_provider.TTPClient.uninit()
        crypten.uninit()  # destroys the process groups
    except RuntimeError as exc:
        # The peer may already be gone; tear down locally regardless.
        log.info("shutdown: %s", exc)
        DistributedCommunicator.instance = None
        if dist.is_initialized():
            dist.destroy_process_group()
    _state.clear()


# --------------------------------------------------------------------------
# Several two-party sessions in one process (the client side).
# --------------------------------------------------------------------------
class SessionMPC:
    """One session's CrypTen state, in a process that may hold several sessions.

    CrypTen keeps its state in process globals: the communicator
    (``DistributedCommunicator.instance``), the PRGs (``crypten.generators``),
    the tuple provider (``cfg.mpc.provider``) and this module's ``_state``.
    A session joins with its own of each; :meth:`activate` puts a session's
    back in place before it runs (a no-op when it is already there), so two
    models in one process take turns on one thread. Not for concurrent use
    from several threads.
    """

    _installed: "SessionMPC | None" = None

    def __init__(self, role: str, config: MPCConfig, channel):
        if config.uses_ttp:
            raise ValueError("SessionMPC is for the two-party modes (the TTP benchmark mode uses one process per party)")
        SessionMPC._uninstall()
        try:
            init_party(role, config, channel)
        except BaseException:
            SessionMPC._uninstall()
            raise
        crypten = import_crypten()
        from crypten.communicator import DistributedCommunicator
        from crypten.config import cfg

        self._communicator = DistributedCommunicator.instance
        self._generators = {kind: dict(gens) for kind, gens in crypten.generators.items()}
        self._provider_name = cfg.mpc.provider
        self._provider = vars(crypten.mpc)["__SUPPORTED_PROVIDERS"][cfg.mpc.provider]
        self._state = dict(_state)
        self.closed = False
        SessionMPC._installed = self

    def activate(self) -> None:
        """Make this session's CrypTen state the process's."""
        if self.closed:
            raise RuntimeError("this session's MPC state is closed")
        if SessionMPC._installed is self:
            return
        crypten = import_crypten()
        from crypten.communicator import DistributedCommunicator
        from crypten.config import cfg

        DistributedCommunicator.instance = self._communicator
        for kind, gens in self._generators.items():
            crypten.generators[kind].clear()
            crypten.generators[kind].update(gens)
        vars(crypten.mpc)["__SUPPORTED_PROVIDERS"][self._provider_name] = self._provider
        cfg.mpc.provider = self._provider_name
        _state.clear()
        _state.update(self._state)
        SessionMPC._installed = self

    def close(self) -> None:
        """Leave: this session's state is dropped (another session's is untouched)."""
        if self.closed:
            return
        self.activate()
        shutdown()
        SessionMPC._uninstall()
        self.closed = True

    @staticmethod
    def _uninstall() -> None:
        """Take whatever session state is installed out of CrypTen's globals (its owner keeps it)."""
        crypten = import_crypten()
        from crypten.communicator import DistributedCommunicator

        DistributedCommunicator.instance = None
        for gens in crypten.generators.values():
            gens.clear()
        _state.clear()
        SessionMPC._installed = None


def correlation_provider():
    """The tuple provider of the current session (CrypTen's, as configured)."""
    return import_crypten().mpc.get_default_provider()


def current_role() -> str | None:
    return _state.get("role")


def party_channel():
    """The channel CrypTen runs over in this process (two-party modes), e.g. for
    a launch_local job that also sends ciphertexts to its peer."""
    from crypten.communicator import DistributedCommunicator

    return getattr(DistributedCommunicator.instance, "channel", None)


# --------------------------------------------------------------------------
# Peer failures -> PeerError naming the peer.
# --------------------------------------------------------------------------
# Lower-case fragments of the messages gloo and torch.distributed raise when a
# peer dies or stays silent. Gloo's wording varies by code path and version
# ("Connection closed by peer", "Timed out waiting ... for recv", "Application
# timeout caused pair closure"), so match loosely and case-insensitively.
_COMM_ERROR_MARKERS = (
    "gloo",
    "connection closed",
    "connection reset",
    "timed out",
    "timeout",
    "pair closure",
    "socket",
    "broken pipe",
)


def is_peer_failure(exc: BaseException) -> bool:
    from ..protocol.transport import TransportError

    if isinstance(exc, (PeerError, TransportError)):
        return True
    dist_error = getattr(dist, "DistBackendError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in message for m in _COMM_ERROR_MARKERS)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A dead child not yet reaped by its parent is a zombie: treat as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def translate_peer_error(exc: BaseException) -> BaseException:
    """Turn a gloo communication error into a PeerError naming the peer(s).

    Non-communication errors are returned unchanged."""
    if isinstance(exc, PeerError) or not is_peer_failure(exc):
        return exc
    role = _state.get("role", "?")
    config = _state.get("config")
    peers = {r: v for r, v in _state.get("peers", {}).items() if r != role}
    if not peers:
        candidates = [r for r in PARTY_ROLES + (DEALER,) if r != role]
        if config is not None and not config.uses_ttp:
            candidates = [r for r in candidates if r != DEALER]
        named = " or ".join(f"{r!r} (rank {rank_of(r)})" for r in candidates)
        detail = f"peer {named} unreachable"
    else:
        here = socket.gethostname()
        dead = [r for r, (host, pid) in peers.items() if host == here and not _pid_alive(pid)]
        if dead:
            detail = "peer " + ", ".join(
                f"{r!r} (rank {rank_of(r)}, pid {peers[r][1]}) has exited" for r in dead
            )
        else:
            named = " or ".join(f"{r!r} (rank {rank_of(r)})" for r in peers)
            detail = f"peer {named} closed the connection or did not answer"
    timeout = f" (timeout {config.timeout_s:g} s)" if config is not None else ""
    return PeerError(f"MPC {role!r}: {detail}{timeout}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------
# launch_local: server + client (+ dealer) as programs of their own.
# --------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on host (small race: it is released here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_result(path: str, message) -> None:
    with open(path + ".tmp", "wb") as f:
        pickle.dump(message, f)
    os.replace(path + ".tmp", path)  # the parent never reads a half-written file


def child_main(job_path: str, result_path: str) -> None:
    """Body of one launch_local child (``python -m cryptogen_hf.mpc.child``):
    import the job's function by name, join the session, run, write the result."""
    with open(job_path, "rb") as f:
        role, module_name, qualname, config, args, channel_fd = pickle.load(f)
    try:
        if role == DEALER:
            run_dealer(config)
            _write_result(result_path, ("ok", None))
            return
        fn = importlib.import_module(module_name)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        channel = None
        if channel_fd is not None:
            from ..protocol.transport import Channel

            peer = CLIENT if role == SERVER else SERVER
            channel = Channel(socket.socket(fileno=channel_fd), peer, timeout_s=config.timeout_s)
        init_party(role, config, channel)
        try:
            value = fn(role, *args)
        except BaseException as exc:  # noqa: BLE001 (reported to the parent)
            raise translate_peer_error(exc) from exc
        shutdown()
        _write_result(result_path, ("ok", value))
    except BaseException as exc:  # noqa: BLE001
        _write_result(result_path, ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        os._exit(1)  # do not wait in torch.distributed teardown with a dead peer


def _import_root(module_name: str) -> str:
    """The folder from which ``module_name`` is imported (a test or script folder
    is not on a child's path otherwise); the installed package needs none."""
    top = sys.modules[module_name.split(".")[0]]
    path = os.path.abspath(top.__file__)
    levels = 2 if os.path.basename(path) == "__init__.py" else 1
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


def launch_local(
    fn: Callable[..., Any],
    config: MPCConfig,
    args: tuple = (),
    *,
    wall_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run ``fn(role, *args)`` as "server" and "client" in two new OS
    processes (plus the TTP dealer process in ttp mode) on loopback.

    Each child is a program of its own (``python -m cryptogen_hf.mpc.child``)
    that imports ``fn`` by module and name, so nothing re-runs the caller's
    ``__main__`` (multiprocessing's spawn would, and an unguarded script
    would then start itself again). ``fn`` must therefore live in an
    importable module, and ``args`` must pickle. Returns
    ``{"server": value, "client": value}``. If a child raises or dies, raises
    :class:`MPCLaunchError` with every failed child's traceback text; after
    ``wall_timeout_s`` (or ``config.timeout_s + 10`` s after the first
    failure) every remaining child is killed.
    """
    if fn.__module__ == "__main__":
        raise ValueError(
            "launch_local runs fn in new programs that import it by name: define it in an importable "
            "module, not in the script being run"
        )
    if config.uses_ttp and config.port == 0:
        config = dataclasses.replace(config, port=free_port(config.host))
    roles = list(PARTY_ROLES) + ([DEALER] if config.uses_ttp else [])
    # Two parties talk over a socket pair made here (no port at all); the
    # TTP benchmarks' three processes meet through gloo on loopback.
    ends = {} if config.uses_ttp else dict(zip(PARTY_ROLES, socket.socketpair()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_import_root(fn.__module__), os.environ.get("PYTHONPATH")])))
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}  # role -> description, in order of arrival
    with tempfile.TemporaryDirectory(prefix="cryptogen-launch-") as tmp:
        procs: dict[str, subprocess.Popen] = {}
        result_paths = {}
        for role in roles:
            job_path = os.path.join(tmp, f"{role}.job")
            result_paths[role] = os.path.join(tmp, f"{role}.result")
            fd = ends[role].fileno() if role in ends else None
            with open(job_path, "wb") as f:
                pickle.dump((role, fn.__module__, fn.__qualname__, config, tuple(args), fd), f)
            procs[role] = subprocess.Popen(
                [sys.executable, "-m", "cryptogen_hf.mpc.child", job_path, result_paths[role]], env=env,
                pass_fds=() if fd is None else (fd,),
            )
        for end in ends.values():
            end.close()  # the children hold them now; a dead child's end then closes for its peer
        deadline = time.monotonic() + wall_timeout_s
        try:
            while True:
                pending = [r for r in roles if r not in results and r not in failures]
                if not [r for r in pending if r in PARTY_ROLES]:
                    break
                if time.monotonic() > deadline:
                    for r in pending:
                        if r in PARTY_ROLES:
                            failures[r] = f"{r}: killed after the launch time limit"
                    break
                time.sleep(0.05)
                for r in pending:
                    code = procs[r].poll()
                    if code is None:
                        continue
                    if os.path.exists(result_paths[r]):
                        with open(result_paths[r], "rb") as f:
                            message = pickle.load(f)
                        if message[0] == "ok":
                            results[r] = message[1]
                            continue
                        _, summary, tb = message
                        failures[r] = f"{r}: {summary}\n--- {r} traceback ---\n{tb}"
                    else:
                        failures[r] = f"{r}: process exited with code {code} without a result"
                    # The survivors will notice within their own timeout.
                    deadline = min(deadline, time.monotonic() + config.timeout_s + 10)
            # Give the dealer a moment to see "terminate" and exit cleanly.
            if DEALER in procs and not failures:
                try:
                    procs[DEALER].wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=5)

    if failures:
        raise MPCLaunchError(
            "MPC launch failed:\n" + "\n".join(failures.values()),
            results=results,
            failures=failures,
        )
    return {r: results[r] for r in PARTY_ROLES}
