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

Fails loudly: if crypten is missing, if importing it still fails, or if the
version is not the one this shim was written for, :func:`import_crypten`
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
    _crypten = crypten
    return crypten
