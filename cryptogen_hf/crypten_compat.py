"""Make ``import crypten`` (0.4.1, the latest release) work on torch 2.13.

Why this module exists
----------------------
CrypTen 0.4.1 was released in 2022. Importing it on a modern torch fails in
one place only: ``crypten/nn/onnx_converter.py`` (imported by ``crypten.nn``,
which ``crypten/__init__`` imports) does::

    try:
        import torch.onnx.symbolic_registry as sym_registry   # torch < 1.13
    except ImportError:
        from torch.onnx._internal.registration import registry   # torch < 2.9

Both modules are gone from torch 2.13, so the second import raises and the
whole package fails to import. That registry is only used by CrypTen's ONNX
model *converter* (``crypten.nn.from_pytorch`` / ``from_onnx``), which
cryptogen_hf never calls: we drive CrypTen's tensors and protocols directly.

The fix: before importing crypten, register a stand-in module under the
removed name whose ``registry`` raises a clear error if anything ever touches
it. The MPC arithmetic (``crypten.mpc``), the communicator and the
providers are untouched.

The packaging half of the fix lives in ``scripts/setup_env.sh``: crypten is
installed with ``--no-deps`` (its metadata asks for the dead ``sklearn``
package) and the packages it imports at load time (onnx, omegaconf, pyyaml)
are ordinary dependencies in ``pyproject.toml``.

Cryptographic randomness (the second patch)
-------------------------------------------
CrypTen draws every share, zero-sharing, triple and mask from torch
generators (mt19937), seeded through ``torch.Generator.manual_seed``, which
keeps only 32 bits of a seed: either party could search the other's seed.
:func:`_install_secure_randomness` replaces, in every CrypTen module that
bound them:

- ``generate_random_ring_element`` / ``generate_kbit_random_tensor``
  (``crypten.common.rng`` and the modules that imported them by name) with
  versions that draw from :class:`cryptogen_hf.mpc.prg.AESCounterPRG` and
  REFUSE any other generator (a torch.Generator raises);
- ``crypten._setup_prng`` (the pairwise "prev"/"next", "local" and "global"
  generators) with AES-256-CTR generators keyed by 256-bit seeds from the OS,
  exchanged as bytes; ``crypten.manual_seed`` is disabled;
- the TTP dealer's seed set-up (``TTPClient``/``TTPServer._setup_generators``)
  the same way.

The communicator (the fourth patch): ``DistributedCommunicator.is_initialized``
accepts the two-party communicator on the session channel
(:mod:`cryptogen_hf.mpc.channel_comm`), which needs no torch.distributed.

Comparisons (the third patch): ``MPCTensor._ltz``, under every CrypTen
comparison, computes only the top bit of the sum of the two shares
(:mod:`cryptogen_hf.mpc.compare`, 181 AND gates) instead of CrypTen's whole
64-bit adder (832); every AND gate costs HE work when there is no dealer.

Fails loudly: if crypten is missing, if importing it still fails, if the
version is not the one this shim was written for, or if any function the
patches replace is not where (or what) they expect, :func:`import_crypten`
raises :class:`CryptenCompatError` naming the problem and the fix.
"""

from __future__ import annotations

import importlib
import sys
import types

SUPPORTED_CRYPTEN_VERSION = "0.4.1"
_REMOVED_TORCH_MODULE = "torch.onnx._internal.registration"

_crypten = None


class CryptenCompatError(ImportError):
    """CrypTen cannot be imported by cryptogen_hf on this installation."""


class _RemovedOnnxRegistry:
    """Stands in for torch's removed ONNX symbolic registry; unusable by design."""

    def __getattr__(self, name):
        raise CryptenCompatError(
            f"CrypTen's ONNX converter touched torch's ONNX symbolic registry "
            f"(attribute {name!r}), which torch removed. cryptogen_hf does not "
            f"support crypten.nn.from_pytorch/from_onnx on this torch; build "
            f"secure computations from crypten tensors instead."
        )


def _installed_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _torch_has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def _is_stand_in(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and isinstance(getattr(module, "registry", None), _RemovedOnnxRegistry)


def shim_needed() -> bool:
    """True when this torch lacks both ONNX registries CrypTen 0.4.1 imports."""
    if _is_stand_in(_REMOVED_TORCH_MODULE):
        return True
    return not (
        _torch_has_module("torch.onnx.symbolic_registry")
        or _torch_has_module(_REMOVED_TORCH_MODULE)
    )


def import_crypten():
    """Import and return the ``crypten`` module, applying the torch shim once."""
    global _crypten
    if _crypten is not None:
        return _crypten

    version = _installed_version("crypten")
    if version is None:
        raise CryptenCompatError(
            "crypten is not installed. Install it without its broken metadata: "
            "`pip install --no-deps crypten==0.4.1` (scripts/setup_env.sh does this)."
        )
    if version != SUPPORTED_CRYPTEN_VERSION:
        raise CryptenCompatError(
            f"crypten {version} is installed but cryptogen_hf's compatibility fix "
            f"was written for {SUPPORTED_CRYPTEN_VERSION}; check "
            f"cryptogen_hf/crypten_compat.py against the new release."
        )

    if shim_needed() and _REMOVED_TORCH_MODULE not in sys.modules:
        stand_in = types.ModuleType(_REMOVED_TORCH_MODULE)
        stand_in.__doc__ = "cryptogen_hf stand-in for a module removed from torch"
        stand_in.registry = _RemovedOnnxRegistry()
        sys.modules[_REMOVED_TORCH_MODULE] = stand_in

    try:
        import crypten  # noqa: WPS433 (import after the shim on purpose)
    except Exception as exc:  # any failure here means the fix no longer applies
        raise CryptenCompatError(
            f"`import crypten` failed even with cryptogen_hf's torch shim "
            f"({type(exc).__name__}: {exc}). The torch or crypten release changed "
            f"in a way cryptogen_hf/crypten_compat.py does not handle."
        ) from exc

    # The parts we rely on must be there and be the real thing.
    for attr in ("init", "cryptensor", "mpc", "communicator"):
        if not hasattr(crypten, attr):
            raise CryptenCompatError(f"crypten imported but lacks crypten.{attr}")
    _install_secure_randomness(crypten)
    _install_lean_comparison()
    _install_channel_communicator_check()
    _crypten = crypten
    return crypten


# ---------------------------------------------------------------------------
# Cryptographic randomness for every CrypTen random draw.
# ---------------------------------------------------------------------------
# Modules that bind CrypTen's two random-tensor helpers by name (checked: each
# must hold the ORIGINAL function before the patch, so a CrypTen release that
# moved or renamed them fails here instead of silently keeping mt19937).
_RNG_USERS = {
    "crypten.common.rng": ("generate_random_ring_element", "generate_kbit_random_tensor"),
    "crypten.mpc.primitives.arithmetic": ("generate_random_ring_element",),
    "crypten.mpc.primitives.binary": ("generate_kbit_random_tensor",),
    "crypten.mpc.provider.ttp_provider": ("generate_random_ring_element", "generate_kbit_random_tensor"),
    "crypten.mpc.provider.tfp_provider": ("generate_random_ring_element", "generate_kbit_random_tensor"),
}
_GENERATOR_KINDS = ("prev", "next", "local", "global")


class InsecureGeneratorError(TypeError):
    """A random draw for a share or mask was asked of a non-cryptographic generator."""


def _prg_for(crypten, generator, device):
    import torch

    from cryptogen_hf.mpc.prg import AESCounterPRG

    if device is not None and str(device) != "cpu":
        raise CryptenCompatError(f"cryptogen_hf runs CrypTen on the CPU only (asked for device {device!r})")
    if generator is None:
        # CrypTen's default is the party's "local" generator; before the
        # session's set-up there is none yet, so make one (local = private).
        local = crypten.generators["local"]
        generator = local.get(torch.device("cpu"))
        if generator is None:
            generator = local[torch.device("cpu")] = AESCounterPRG()
    if not isinstance(generator, AESCounterPRG):
        raise InsecureGeneratorError(
            f"CrypTen asked for randomness from {type(generator).__name__}; only the AES-CTR PRG "
            f"(cryptogen_hf.mpc.prg.AESCounterPRG) may make shares and masks"
        )
    return generator


def _install_secure_randomness(crypten) -> None:
    for module_name, names in _RNG_USERS.items():
        module = importlib.import_module(module_name)
        for name in names:
            fn = getattr(module, name, None)
            if fn is None or getattr(fn, "__module__", None) != "crypten.common.rng":
                raise CryptenCompatError(
                    f"{module_name}.{name} is not CrypTen's random-tensor helper; the randomness patch "
                    f"in cryptogen_hf/crypten_compat.py no longer matches this CrypTen"
                )

    def generate_random_ring_element(size, ring_size=(2**64), generator=None, **kwargs):
        if ring_size != 2**64:
            raise CryptenCompatError(f"random ring elements are only made for the ring 2**64, not {ring_size}")
        return _prg_for(crypten, generator, kwargs.get("device")).ring_elements(size)

    def generate_kbit_random_tensor(size, bitlength=None, generator=None, **kwargs):
        bitlength = 64 if bitlength is None else int(bitlength)
        return _prg_for(crypten, generator, kwargs.get("device")).kbit(size, bitlength)

    replacements = {
        "generate_random_ring_element": generate_random_ring_element,
        "generate_kbit_random_tensor": generate_kbit_random_tensor,
    }
    for module_name, names in _RNG_USERS.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, replacements[name])

    if set(getattr(crypten, "generators", {})) != set(_GENERATOR_KINDS) or not hasattr(crypten, "_setup_prng"):
        raise CryptenCompatError("crypten.generators / crypten._setup_prng are not what the randomness patch expects")
    crypten._setup_prng = _setup_prng
    crypten.manual_seed = _refuse_manual_seed

    from crypten.mpc.provider import ttp_provider

    client_core = getattr(ttp_provider.TTPClient, "_TTPClient__TTPClient", None)
    if client_core is None or not hasattr(client_core, "_setup_generators") or not hasattr(ttp_provider.TTPServer, "_setup_generators"):
        raise CryptenCompatError("CrypTen's TTPClient/TTPServer no longer have _setup_generators; the randomness patch does not apply")
    client_core._setup_generators = _ttp_client_setup_generators
    ttp_provider.TTPServer._setup_generators = _ttp_server_setup_generators


def _install_lean_comparison() -> None:
    """MPCTensor._ltz (under every CrypTen comparison) -> mpc/compare.py."""
    from crypten.mpc.mpc import MPCTensor

    if not callable(getattr(MPCTensor, "_ltz", None)):
        raise CryptenCompatError("crypten's MPCTensor has no _ltz; the comparison patch does not apply")
    MPCTensor._ltz = _ltz


def _install_channel_communicator_check() -> None:
    """DistributedCommunicator.is_initialized: an installed instance, whatever it is.

    CrypTen looks its communicator up through ``DistributedCommunicator.instance``
    and counts it as initialised only while torch.distributed is; the
    two-party communicator on the session channel (mpc/channel_comm.py) uses
    no torch.distributed at all."""
    from crypten.communicator import DistributedCommunicator

    check = vars(DistributedCommunicator).get("is_initialized")
    if not isinstance(check, classmethod) or "instance" not in vars(DistributedCommunicator):
        raise CryptenCompatError("CrypTen's DistributedCommunicator.is_initialized/instance changed; the communicator patch does not apply")
    DistributedCommunicator.is_initialized = classmethod(_communicator_is_initialized)


def _communicator_is_initialized(cls):
    import torch.distributed as dist
    from crypten.communicator import DistributedCommunicator

    instance = cls.instance
    if instance is None:
        return False
    return dist.is_initialized() if isinstance(instance, DistributedCommunicator) else True


def _ltz(self):
    from cryptogen_hf.mpc.compare import ltz

    return ltz(self)


def _seed_tensor(seed: bytes):
    import torch

    return torch.frombuffer(bytearray(seed), dtype=torch.uint8).clone()


def _setup_prng():
    """crypten._setup_prng with AES-CTR generators and 256-bit seeds.

    "next" is shared with the next rank (we send it), "prev" with the previous
    rank (we receive it), "global" with everyone (rank 0's), "local" is ours
    alone. Two parties: each pairwise seed is known to exactly both parties,
    which is what the pseudo-random zero-sharings need."""
    import crypten
    import crypten.communicator as comm
    import torch

    from cryptogen_hf.mpc.prg import SEED_BYTES, AESCounterPRG, new_seed

    world_size = comm.get().get_world_size()
    rank = comm.get().get_rank()
    next_seed = _seed_tensor(new_seed())
    prev_seed = _seed_tensor(bytes(SEED_BYTES))
    if world_size >= 2:
        send = comm.get().isend(next_seed, (rank + 1) % world_size)
        recv = comm.get().irecv(prev_seed, src=(rank - 1) % world_size)
        send.wait()
        recv.wait()
    else:
        prev_seed = next_seed
    global_seed = comm.get().broadcast(_seed_tensor(new_seed()), 0)
    seeds = {"prev": prev_seed, "next": next_seed, "global": global_seed}
    for kind in _GENERATOR_KINDS:
        crypten.generators[kind].clear()
        seed = new_seed() if kind == "local" else bytes(seeds[kind].tolist())
        crypten.generators[kind][torch.device("cpu")] = AESCounterPRG(seed)  # CrypTen keys by device


def _refuse_manual_seed(*args, **kwargs):
    raise CryptenCompatError("crypten.manual_seed is disabled: every CrypTen seed is a 256-bit seed from the OS")


def _ttp_client_setup_generators(self):
    """A party's side of the TTP seed: 32 bytes from the dealer, AES-CTR PRG."""
    import crypten.communicator as comm
    import torch.distributed as dist

    from cryptogen_hf.mpc.prg import SEED_BYTES, AESCounterPRG

    seed = _seed_tensor(bytes(SEED_BYTES))
    dist.irecv(tensor=seed, src=comm.get().get_ttp_rank(), group=self.ttp_group).wait()
    dist.barrier(group=self.ttp_group)
    self.generator = AESCounterPRG(bytes(seed.tolist()))
    self.generator_cuda = None


def _ttp_server_setup_generators(self):
    """The dealer's side: an independent 256-bit OS seed per party."""
    import crypten.communicator as comm
    import torch.distributed as dist

    from cryptogen_hf.mpc.prg import AESCounterPRG, new_seed

    seeds = [new_seed() for _ in range(comm.get().get_world_size())]
    requests = [dist.isend(tensor=_seed_tensor(s), dst=i, group=self.ttp_group) for i, s in enumerate(seeds)]
    self.generators = [AESCounterPRG(s) for s in seeds]
    self.generators_cuda = [None for _ in seeds]
    for r in requests:
        r.wait()
    dist.barrier(group=self.ttp_group)
