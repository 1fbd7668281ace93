"""HE <-> shares conversions through two real processes (plus the TTP dealer).

What is checked: round trips are exact up to the fixed-point truncation; the
HE -> shares direction is exact for values across the whole (-p/2, p/2)
range; and everything the client receives during conversions is uniformly
masked (no correlation with the true values).
"""

import numpy as np
import pytest
import torch

from cryptogen_hf.crypten_compat import import_crypten
from cryptogen_hf.he import ClientHE, HEParams, ServerHE
from cryptogen_hf.mpc.runtime import CLIENT, SERVER, MPCConfig, launch_local, party_channel, rank_of
from cryptogen_hf.protocol.convert import he_to_shares, shares_to_he
from cryptogen_hf.protocol.layouts import SlotVector
from cryptogen_hf.protocol.shared_matmul import matmul_mod, shared_matmul
from cryptogen_hf.protocol.party import Party

N_VALUES = 512
N_TRIALS = 40


def _open_party(role):
    """HE keys for one role, over the channel CrypTen already runs on (launch_local joined it)."""
    channel = party_channel()
    if role == SERVER:
        he = ServerHE.from_bundle(channel.recv_payload("he_bundle"))
    else:
        he = ClientHE(HEParams())
        channel.send("he_bundle", he.public_bundle([]))
    return Party(role, channel, he)


def _reveal_ring(t):
    """Open shares as exact Z_2^64 integers (CrypTen's float32 get_plain_text is lossy above ~2^24)."""
    import crypten.communicator as comm

    return comm.get().all_reduce(t._tensor.share.clone())


def _conversion_session(role):
    crypten = import_crypten()
    party = _open_party(role)
    p = party.he.p
    layout = SlotVector(N_VALUES, party.he.slot_count)
    gen = torch.Generator().manual_seed(7)  # test inputs, same on both sides for the assertions
    out = {}

    # 1. shares -> HE -> shares round trip of the client's private input (12 fractional bits in HE).
    x = (torch.rand(N_VALUES, generator=gen) - 0.5) * 200.0
    xs = crypten.cryptensor(x if party.is_client else torch.zeros(N_VALUES), src=rank_of(CLIENT))
    cts = shares_to_he(party, xs, layout, frac_bits=12)
    back = he_to_shares(party, cts, layout, frac_bits=12, n=N_VALUES)
    out["roundtrip"] = _reveal_ring(back)
    out["x_ring"] = _reveal_ring(xs)
    out["x"] = x

    # 2. HE -> shares exactness across the whole supported range |y| < p/4, with 20
    #    fractional bits (so CrypTen's truncation by 4 bits is exercised) and a server-side addend.
    ints = torch.randint(-(p // 4) + 1, p // 4, (N_VALUES,), generator=gen)
    ints[:4] = torch.tensor([-(p // 4) + 1, p // 4 - 1, 0, -1])
    small = torch.randint(-(2**40), 2**40, (N_VALUES,), generator=gen)
    addend = torch.randint(-(2**30), 2**30, (N_VALUES,), generator=gen)
    if party.is_server:
        # The server encrypts values of its own with the public key (legitimate: no secret involved).
        cts_full = [party.he.encrypt(np.asarray(ints) % p)]
        cts_small = [party.he.encrypt(np.asarray(small) % p)]
    else:
        cts_full = cts_small = None
    full = he_to_shares(party, cts_full, layout, frac_bits=16, n=N_VALUES)
    out["full"] = _reveal_ring(full)
    trunc = he_to_shares(party, cts_small, layout, frac_bits=20, n=N_VALUES, server_addend=addend.numpy())
    out["trunc"] = _reveal_ring(trunc)
    out["ints"], out["small"], out["addend"] = ints, small, addend

    # 4. The product of two shared matrices (a prompt's attention): X the client's, Y the
    #    server's, 3 heads, sizes that leave segments partly empty.
    X = torch.randn(3, 9, 5, generator=gen) * 3
    Y = torch.randn(3, 5, 7, generator=gen) * 3
    xs = crypten.cryptensor(X if party.is_client else torch.zeros_like(X), src=rank_of(CLIENT))
    ys = crypten.cryptensor(Y if party.is_server else torch.zeros_like(Y), src=rank_of(SERVER))
    product = shared_matmul(party, xs, ys, 12, 12)
    out["matmul"], out["matmul_expected"] = _reveal_ring(product).double() / 2**16, X.double() @ Y.double()

    # 3. What the client sees: record the decrypted masked values and the masked shares
    #    over many conversions of the SAME secret vector and of different ones.
    seen_from_he, seen_to_he = [], []
    if party.is_client:
        original_decrypt = party.he.decrypt

        def recording_decrypt(ct):
            slots = original_decrypt(ct)
            seen_from_he.append(slots[:N_VALUES].copy())
            return slots

        party.he.decrypt = recording_decrypt
        # Recorded as the protocol code receives them (the channel may have read
        # a message earlier, while it waited for another).
        original_recv = party.channel.recv

        def recording_recv(expect_kind=None, timeout_s=None):
            kind, payload = original_recv(expect_kind, timeout_s)
            if kind == "to_he.masked_share":
                seen_to_he.append(payload)
            return kind, payload

        party.channel.recv = recording_recv
    secrets = []
    for trial in range(N_TRIALS):
        v = torch.linspace(-50, 50, N_VALUES) * (trial % 2)  # alternates: zeros, a ramp
        secrets.append(v)
        vs = crypten.cryptensor(v if party.is_client else torch.zeros(N_VALUES), src=rank_of(CLIENT))
        c = shares_to_he(party, vs, layout, frac_bits=12)
        he_to_shares(party, c, layout, frac_bits=12, n=N_VALUES)
    out["seen_from_he"] = np.stack(seen_from_he) if seen_from_he else None
    out["seen_to_he"] = seen_to_he
    out["secrets"] = torch.stack(secrets)
    out["p"] = p
    return out


@pytest.fixture(scope="module")
def results():
    return launch_local(_conversion_session, MPCConfig(dealer="none", timeout_s=60), wall_timeout_s=600)


def test_shares_he_roundtrip_within_one_ulp(results):
    r = results[CLIENT]
    # In 16-bit units: the conversion keeps 12 bits, so the error is below 2 units of 2^-12.
    err = (r["roundtrip"] - r["x_ring"]).abs().max().item()
    assert err <= 2 * 16, err
    assert torch.allclose(r["roundtrip"].double() / 2**16, r["x"].double(), atol=2**-11)


def test_he_to_shares_exact_over_whole_range(results):
    r = results[CLIENT]
    assert torch.equal(r["full"], r["ints"])  # exact, extremes +-(p/4 - 1), 0 and -1 included


@pytest.mark.parametrize("p", [3, 5, 7, 13, 31, 97])
def test_wrap_is_the_and_of_one_bit_from_each_party(p):
    """he_to_shares' identity, for every value v in [0, h), h = (p+1)/2, and every mask r:
    [v + r >= p] == [r >= h] AND [(v + r) mod p < h]."""
    h = (p + 1) // 2
    for v in range(h):
        for r in range(p):
            a = (v + r) % p
            assert (v + r >= p) == (r >= h and a < h), (p, v, r)


def test_he_to_shares_truncates_and_adds_server_addend(results):
    r = results[CLIENT]
    expected = torch.div(r["small"] + r["addend"], 16, rounding_mode="floor")  # 20 -> 16 fractional bits
    assert (r["trunc"] - expected).abs().max().item() <= 1  # CrypTen's local truncation: one unit


def test_shared_matmul_matches_the_plaintext_product(results):
    r = results[CLIENT]
    # Each operand keeps 12 fractional bits: error below inner * |operand| * 2^-12 per entry.
    assert (r["matmul"] - r["matmul_expected"]).abs().max().item() < 5 * 12 * 2**-11


def test_matmul_mod_is_exact():
    rng = np.random.default_rng(0)
    p = HEParams().plain_modulus
    A = rng.integers(0, p, (2, 6, 300), dtype=np.uint64)
    B = rng.integers(0, p, (2, 300, 4), dtype=np.uint64)
    A[0, 0], B[0, :, 0] = p - 1, p - 1  # the largest residues
    expected = np.array([[[sum(int(a) * int(b) for a, b in zip(A[h, i], B[h, :, j])) % p for j in range(4)] for i in range(6)] for h in range(2)], dtype=np.uint64)
    assert np.array_equal(matmul_mod(A, B, p), expected)


def test_client_view_is_uniformly_masked(results):
    r = results[CLIENT]
    p = r["p"]
    seen = r["seen_from_he"].astype(np.float64) / p  # decrypted masked values, scaled to [0, 1)
    secrets = r["secrets"].numpy()
    # Uniform on [0, 1): mean 1/2, variance 1/12, whatever the secret was.
    assert abs(seen.mean() - 0.5) < 0.01
    assert abs(seen.var() - 1 / 12) < 0.005
    # No correlation between what the client sees and the secret behind it.
    corr = np.corrcoef(seen.reshape(-1), secrets.reshape(-1))[0, 1]
    assert abs(corr) < 0.02, corr
    # Same secret twice -> unrelated views (fresh masks every time).
    assert not np.array_equal(r["seen_from_he"][0], r["seen_from_he"][2])
    # The masked shares of the shares -> HE direction are uniform 64-bit words.
    words = np.concatenate([np.frombuffer(b[1:], dtype=np.uint64) for b in r["seen_to_he"]]).astype(np.float64) / 2.0**64
    assert abs(words.mean() - 0.5) < 0.01
    assert words.size == secrets.size
    assert abs(np.corrcoef(words, secrets.reshape(-1))[0, 1]) < 0.02
