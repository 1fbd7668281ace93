"""Where every share, mask and correlation gets its randomness.

torch's generators keep 32 bits of a seed and mt19937 is not a cryptographic
generator, so CrypTen's randomness is replaced (cryptogen_hf/crypten_compat.py)
by AES-256-CTR keyed with 256-bit seeds from the OS (cryptogen_hf/mpc/prg.py).
"""

import os

import numpy as np
import pytest
import torch

from cryptogen_hf.crypten_compat import CryptenCompatError, InsecureGeneratorError, _install_secure_randomness, import_crypten
from cryptogen_hf.mpc.prg import SEED_BYTES, AESCounterPRG, new_seed
from cryptogen_hf.mpc.runtime import MPCConfig, launch_local


def test_seeds_that_differ_only_above_bit_32_give_different_streams():
    low = bytes(4) + bytes(SEED_BYTES - 4)
    high = bytes(4) + b"\x01" + bytes(SEED_BYTES - 5)  # bit 32 set, low 32 bits equal
    assert not torch.equal(AESCounterPRG(low).ring_elements((64,)), AESCounterPRG(high).ring_elements((64,)))
    # Same seed, same stream (the pairwise zero-sharings rely on it).
    assert torch.equal(AESCounterPRG(high).ring_elements((64,)), AESCounterPRG(high).ring_elements((64,)))
    # Why torch's generator is refused: it keeps only the low 32 bits of a seed.
    a = torch.Generator().manual_seed(2**40 + 5)
    b = torch.Generator().manual_seed(5)
    assert torch.equal(torch.randint(0, 2**62, (8,), generator=a), torch.randint(0, 2**62, (8,), generator=b))


def test_prg_output_is_uniform_and_seeds_come_from_the_os():
    assert len(new_seed()) == SEED_BYTES == 32 and new_seed() != new_seed()
    words = AESCounterPRG().ring_elements((1 << 16,)).numpy().view(np.uint64)
    bits = np.unpackbits(words.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.005  # 2**20 bits: 5 standard deviations ~ 0.0025
    below = AESCounterPRG().below(1000, 100_000)
    assert below.min() >= 0 and below.max() < 1000 and abs(below.mean() - 499.5) < 5
    assert set(np.unique(AESCounterPRG().kbit((4096,), 1).numpy())) == {0, 1}
    with pytest.raises(ValueError, match="32-byte seed"):
        AESCounterPRG(bytes(16))


def test_crypten_random_helpers_refuse_torch_generators():
    import_crypten()
    from crypten.common import rng
    from crypten.mpc.primitives import arithmetic, binary

    with pytest.raises(InsecureGeneratorError, match="AES-CTR"):
        rng.generate_random_ring_element((4,), generator=torch.Generator())
    with pytest.raises(InsecureGeneratorError):
        binary.generate_kbit_random_tensor((4,), bitlength=8, generator=torch.Generator())
    assert arithmetic.generate_random_ring_element is rng.generate_random_ring_element
    # Without a generator CrypTen draws from the party's "local" one: the AES PRG.
    assert rng.generate_random_ring_element((3,)).dtype == torch.long


def test_randomness_patch_fails_loudly_when_crypten_is_not_what_it_expects():
    crypten = import_crypten()
    # Applied already: the helpers are no longer CrypTen's originals, so a second
    # application finds nothing it recognises and must refuse.
    with pytest.raises(CryptenCompatError, match="no longer matches"):
        _install_secure_randomness(crypten)
    with pytest.raises(CryptenCompatError, match="manual_seed is disabled"):
        crypten.manual_seed(1, 2, 3)


def _no_torch_randomness_program(role):
    """A secure step (products, squares, comparisons, softmax, GELU, LayerNorm)
    with every torch and numpy random function made to raise."""
    from cryptogen_hf.crypten_compat import import_crypten

    crypten = import_crypten()
    from cryptogen_hf.mpc import ops

    def refuse(*args, **kwargs):
        raise AssertionError("a non-cryptographic random function was called")

    for name in ("randint", "rand", "randn", "randperm", "normal", "bernoulli", "multinomial"):
        setattr(torch, name, refuse)
    torch.Tensor.random_ = refuse
    torch.Tensor.uniform_ = refuse
    for name in ("randint", "rand", "randn", "random", "default_rng", "seed", "permutation"):
        setattr(np.random, name, refuse)

    kinds = {kind: type(g[torch.device("cpu")]).__name__ for kind, g in crypten.generators.items()}
    x = crypten.cryptensor(torch.linspace(-4, 4, 64).reshape(4, 16) if role == "client" else torch.zeros(4, 16), src=1)
    y = crypten.cryptensor(torch.full((4, 16), 0.5) if role == "server" else torch.zeros(4, 16), src=0)
    out = {
        "prod": (x * y).get_plain_text(),
        "gt": (x > 0).get_plain_text(),
        "softmax": ops.softmax(x).get_plain_text(),
        "gelu": ops.gelu(x).get_plain_text(),
        "ln": ops.layer_norm(x).get_plain_text(),
        "generators": kinds,
        "pid": os.getpid(),
    }
    return out


def test_secure_step_never_uses_torch_or_numpy_randomness():
    result = launch_local(_no_torch_randomness_program, MPCConfig(dealer="none", timeout_s=60), wall_timeout_s=300)
    x = torch.linspace(-4, 4, 64).reshape(4, 16)
    for role in ("server", "client"):
        r = result[role]
        assert r["generators"] == {kind: "AESCounterPRG" for kind in ("prev", "next", "local", "global")}
        assert torch.allclose(r["prod"], x * 0.5, atol=1e-3)
        assert torch.equal(r["gt"].long(), (x > 0).long())
        assert (r["softmax"] - torch.softmax(x, -1)).abs().max() < 1e-2
        assert (r["gelu"] - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() < 2e-3
        assert (r["ln"] - torch.nn.functional.layer_norm(x, (16,))).abs().max() < 2e-2
