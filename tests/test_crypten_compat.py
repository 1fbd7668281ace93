"""The CrypTen import fix: works on this torch, and fails loudly when it no longer applies."""

import subprocess
import sys
import textwrap

import pytest

from cryptogen_hf import crypten_compat


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the shim's effect on sys.modules must be observed from scratch.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_plain_import_of_crypten_fails_without_the_shim_on_this_torch():
    # If this starts passing, torch or crypten changed and the shim may be dead code.
    if not crypten_compat.shim_needed():
        pytest.skip("this torch still ships an ONNX registry; the shim is a no-op here")
    result = _run_fresh("import crypten")
    assert result.returncode != 0
    assert "registration" in result.stderr or "onnx" in result.stderr


def test_import_crypten_gives_working_crypten():
    result = _run_fresh(
        """
        from cryptogen_hf.crypten_compat import import_crypten
        crypten = import_crypten()
        import torch
        crypten.init()
        x = crypten.cryptensor(torch.tensor([1.5, -2.25]))
        y = (x * 2 + 1).get_plain_text()
        assert torch.allclose(y, torch.tensor([4.0, -3.5]), atol=1e-3), y
        print("OK", crypten.__version__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "OK 0.4.1" in result.stdout


def test_stand_in_registry_refuses_use_with_a_clear_message():
    crypten_compat.import_crypten()
    if not crypten_compat.shim_needed():
        pytest.skip("shim not installed on this torch")
    stand_in = sys.modules["torch.onnx._internal.registration"]
    with pytest.raises(crypten_compat.CryptenCompatError, match="ONNX"):
        stand_in.registry.get_function_group  # noqa: B018 (attribute access is the test)


def test_missing_crypten_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(crypten_compat, "_crypten", None)
    monkeypatch.setattr(crypten_compat, "_installed_version", lambda dist: None)
    with pytest.raises(crypten_compat.CryptenCompatError, match="pip install --no-deps crypten==0.4.1"):
        crypten_compat.import_crypten()


def test_unexpected_crypten_version_is_refused(monkeypatch):
    monkeypatch.setattr(crypten_compat, "_crypten", None)
    monkeypatch.setattr(crypten_compat, "_installed_version", lambda dist: "0.5.0")
    with pytest.raises(crypten_compat.CryptenCompatError, match="0.5.0"):
        crypten_compat.import_crypten()
