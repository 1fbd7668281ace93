"""The HE cross products behind the default mode's correlated randomness
(cryptogen_hf/he/ole.py), in one process with the client's and the server's
objects kept apart: exactness, the masks' ranges, noise flooding, bad input.
The two-process protocol is exercised by tests/test_mpc_ops.py and
tests/test_attacks.py."""

import numpy as np
import pytest

from cryptogen_hf.he import CiphertextError
from cryptogen_hf.he.flooding import mulmod
from cryptogen_hf.he.ole import FLOOD_MARGIN_BITS, OLEClient, OLEServer, flood_bits
from cryptogen_hf.mpc.prg import AESCounterPRG
from cryptogen_hf.mpc.two_party import CorrelationError, pack_message, unpack_message

N = 8192 + 100  # two chunks, the second one ragged


@pytest.fixture(scope="module")
def pair():
    client = OLEClient()
    server = OLEServer(client.public_keys())  # the server gets public keys only
    return client, server


def _operands(seed, high):
    rng = np.random.default_rng(seed)  # test inputs only
    return [rng.integers(0, high, N, dtype=np.uint64) for _ in range(4)]


@pytest.mark.parametrize("wide", [True, False])
def test_cross_products_are_exact(pair, wide):
    client, server = pair
    x0, y0, x1, y1 = _operands(1, 2**64 if wide else 2)
    top = np.uint64(2**64 - 1 if wide else 1)  # the largest operands: the cross term's extreme
    x0[:3] = y0[:3] = x1[:3] = y1[:3] = top
    replies, server_share = server.evaluate(client.encrypt(x1, y1, wide), x0, y0, wide, AESCounterPRG())
    client_share = client.decrypt(replies, N, wide)
    assert np.array_equal(server_share + client_share, x0 * y1 + x1 * y0)  # mod 2**64


def test_masks_cover_their_stated_range(pair):
    client, server = pair
    # The mask makes z = cross + R; R must be far wider than the cross term (2**129) and below T/2.
    T = 1
    for pc in server.primes:
        T *= pc.t
    assert server.mask_bits_wide - 129 >= 48 and 2**server.mask_bits_wide <= T // 2
    assert server.mask_bits_narrow >= 43 and 2**server.mask_bits_narrow + 2 < server.primes[0].t
    # What the client decrypts for a zero cross term is the mask itself: spread over its range.
    zeros = np.zeros(N, dtype=np.uint64)
    replies, server_share = server.evaluate(client.encrypt(zeros, zeros, False), zeros, zeros, False, AESCounterPRG())
    seen = client.decrypt(replies, N, False).astype(np.float64) / 2**server.mask_bits_narrow
    assert abs(seen.mean() - 0.5) < 0.02 and seen.max() < 1 and seen.max() > 0.99
    assert np.array_equal(np.uint64(0) - server_share, client.decrypt(replies, N, False))


def test_replies_are_flooded_and_still_decrypt(pair):
    client, server = pair
    x0, y0, x1, y1 = _operands(2, 2**64)
    sent = client.encrypt(x1, y1, True)
    flooded, _ = server.evaluate(sent, x0, y0, True, AESCounterPRG())
    bare, _ = server.evaluate(sent, x0, y0, True, AESCounterPRG(), flood=False)
    pc = server.primes[0]
    before, after = client.noise_budget(bare[0], reply=False), client.noise_budget(flooded[0])
    # Flooding noise 2**flood_bits must dwarf the products' noise by >= 2**64 ...
    products_noise_bits = pc.flooder.delta_bits - before
    assert flood_bits(pc) - products_noise_bits >= 64, (flood_bits(pc), before)
    # ... and the flooded reply, mod-switched to the result level, must still decrypt
    # exactly (budget left, and the shares add up) and be a third smaller than an operand.
    assert after >= FLOOD_MARGIN_BITS - 2 and after < before - 60
    assert len(flooded[0]) < 0.7 * len(bare[0])


def test_bad_messages_and_keys_are_refused(pair):
    client, server = pair
    x = np.zeros(10, dtype=np.uint64)
    sent = client.encrypt(x, x, True)
    with pytest.raises(CiphertextError, match="expected"):
        server.evaluate(sent[:-1], x, x, True, AESCounterPRG())
    with pytest.raises(CiphertextError, match="malformed"):
        server.evaluate([b"junk" * 10] * len(sent), x, x, True, AESCounterPRG())
    with pytest.raises(CiphertextError, match="public keys"):
        OLEServer(client.public_keys()[:2])
    with pytest.raises(CiphertextError, match="malformed"):
        OLEServer([b"\x00" * 64] * 4)
    assert unpack_message(pack_message([b"ab", b"", b"cde"])) == [b"ab", b"", b"cde"]
    for bad in (b"", pack_message([b"ab"])[:-1], pack_message([b"ab"]) + b"x", (10**6).to_bytes(8, "little")):
        with pytest.raises(CorrelationError):
            unpack_message(bad)


def test_mulmod_is_exact_at_the_edges():
    m = (1 << 61) - 1
    rng = np.random.default_rng(3)
    a = np.concatenate([rng.integers(0, m, 1000, dtype=np.uint64), np.array([0, 1, m - 1], dtype=np.uint64)])
    b = np.concatenate([rng.integers(0, m, 1000, dtype=np.uint64), np.array([m - 1, m - 1, m - 1], dtype=np.uint64)])
    want = [int(x) * int(y) % m for x, y in zip(a, b)]
    assert mulmod(a, b, m).tolist() == want
