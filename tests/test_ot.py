"""IKNP random OT and the AND triples made from it (cryptogen_hf/mpc/ot.py), in
one process with each end's objects kept apart: the bit-matrix transpose, the
OTs' correctness, the triples, bad messages, and what each end can learn
about the other's secret (an attack, and its control on a broken variant).
The two-process protocol (base OTs by HE, one round per batch) runs in every
secure test; tests/test_mpc_ops.py checks its comparisons exactly."""

import numpy as np
import pytest

from cryptogen_hf.mpc.ot import (
    KAPPA,
    OTError,
    OTExtensionReceiver,
    OTExtensionSender,
    and_triples_from_ots,
    hash_low_bits,
    transpose_columns,
)
from cryptogen_hf.mpc.prg import SEED_BYTES, AESCounterPRG, new_seed

M = 1 << 14


def _seeds(prg):
    return np.frombuffer(prg.random_bytes(KAPPA * SEED_BYTES), dtype=np.uint8).reshape(KAPPA, SEED_BYTES)


def _base_ots(prg):
    """Ideal base OTs: the receiver's seed pairs, the sender's s and k_s."""
    seeds0, seeds1 = _seeds(prg), _seeds(prg)
    s = np.frombuffer(prg.random_bytes(KAPPA), dtype=np.uint8) & 1
    chosen = np.where(s[:, None] == 1, seeds1, seeds0)
    return seeds0, seeds1, s, chosen


def _ends(prg):
    seeds0, seeds1, s, chosen = _base_ots(prg)
    return OTExtensionReceiver(seeds0, seeds1, AESCounterPRG()), OTExtensionSender(s, chosen), (seeds0, seeds1, s)


def test_transpose_matches_the_bitwise_definition():
    rng = np.random.default_rng(0)  # test input only
    columns = rng.integers(0, 256, (KAPPA, 40), dtype=np.uint8)
    bits = np.unpackbits(columns, axis=1, bitorder="little")  # (KAPPA, 320)
    want = np.packbits(bits.T, axis=1, bitorder="little")
    assert np.array_equal(transpose_columns(columns), want)


def test_random_ots_are_correct_and_balanced():
    receiver, sender, _ = _ends(AESCounterPRG())
    for m in (64, M):  # two batches: the streams and tweaks continue
        u, r, chosen = receiver.extend(m)
        m0, m1 = sender.extend(u, m)
        assert np.array_equal(chosen, np.where(r == 1, m1, m0))
    for bits in (r, m0, m1, m0 ^ m1):
        assert abs(bits.mean() - 0.5) < 0.03


def test_and_triples_from_ots_in_both_directions():
    """Server and client each run one receiver and one sender; the peer's
    sender answers this party's receiver."""
    prg = AESCounterPRG()
    recv_s, send_c, _ = _ends(prg)  # server receives, client sends
    recv_c, send_s, _ = _ends(prg)  # client receives, server sends
    u_s, r_s, mr_s = recv_s.extend(M)
    u_c, r_c, mr_c = recv_c.extend(M)
    a0, b0, c0 = and_triples_from_ots(send_s.extend(u_c, M), (r_s, mr_s))
    a1, b1, c1 = and_triples_from_ots(send_c.extend(u_s, M), (r_c, mr_c))
    assert np.array_equal(c0 ^ c1, (a0 ^ a1) & (b0 ^ b1))
    assert abs((a0 ^ a1).mean() - 0.5) < 0.03 and abs(((a0 ^ a1) & (b0 ^ b1)).mean() - 0.25) < 0.03


def test_wrong_sized_message_is_refused():
    receiver, sender, _ = _ends(AESCounterPRG())
    u, _, _ = receiver.extend(64)
    with pytest.raises(OTError, match="expected"):
        sender.extend(u[:-1], 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        receiver.extend(12)


def _agreement(a, b) -> float:
    return float((a == b).mean())


def test_sender_cannot_recover_the_choice_bits():
    """The sender holds s, k_i^{s_i} and u. Its best handle on r is
    u_i XOR G(k_i^0) XOR G(k_i^1) for a column, which needs both seeds:
    with the other seed replaced by a guess, agreement with r is chance;
    with both seeds (a broken base OT, the control) it is r exactly."""
    receiver, sender, (seeds0, seeds1, s) = _ends(AESCounterPRG())
    u, r, _ = receiver.extend(M)
    u = np.frombuffer(u, dtype=np.uint8).reshape(KAPPA, M // 8)
    i = int(np.argmax(s))  # a column where the sender holds k^1
    own = np.frombuffer(AESCounterPRG(bytes(seeds1[i])).random_bytes(M // 8), dtype=np.uint8)

    def guess(other_seed):
        other = np.frombuffer(AESCounterPRG(bytes(other_seed)).random_bytes(M // 8), dtype=np.uint8)
        return np.unpackbits(u[i] ^ own ^ other, bitorder="little")

    assert abs(_agreement(guess(new_seed()), r) - 0.5) < 0.03
    assert _agreement(guess(seeds0[i]), r) == 1.0  # control: both seeds leak r


def test_receiver_cannot_recover_the_other_message():
    """The receiver holds both seeds of every base OT, t and r. The message it
    did not choose is H(j, t_j XOR s): with s replaced by a guess, agreement
    is chance; knowing s (the control) gives it exactly."""
    receiver, sender, (seeds0, _, s) = _ends(AESCounterPRG())
    u, r, _ = receiver.extend(M)
    m0, m1 = sender.extend(u, M)
    t = np.stack([np.frombuffer(AESCounterPRG(bytes(k)).random_bytes(M // 8), dtype=np.uint8) for k in seeds0])
    rows = transpose_columns(t)
    unchosen = np.where(r == 1, m0, m1)

    def guess(s_bits):
        return hash_low_bits(rows ^ np.packbits(s_bits, bitorder="little"), 0)

    wrong = np.frombuffer(new_seed()[: KAPPA // 8], dtype=np.uint8)
    assert abs(_agreement(guess(np.unpackbits(wrong, bitorder="little")), unchosen) - 0.5) < 0.03
    assert _agreement(guess(s), unchosen) == 1.0  # control: s gives it away
