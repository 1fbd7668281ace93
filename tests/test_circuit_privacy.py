"""Circuit privacy of the model's HE results (he/flooding.py,
``ServerHE.mask_for_client``): what the client decrypts must not depend on the
server's weights beyond the plaintext. Attacks by the client, which holds the
secret key and every evaluation key: recompute the result for a guessed weight
matrix and compare; read the noise's size. Control: results masked the old
way (``add_plain``: c0 only, no flooding). In one process, the client's and
the server's objects apart."""

import numpy as np
import pytest

from cryptogen_hf.he import ClientHE, MatvecPlan, HEParams, ServerHE
from cryptogen_hf.he.flooding import RESULT_STATISTICAL_BITS

D_IN, D_OUT, SAMPLES = 256, 64, 6


@pytest.fixture(scope="module")
def setting():
    params = HEParams()
    client = ClientHE(params)
    plan = MatvecPlan(D_IN, D_OUT, params)
    server = ServerHE.from_bundle(client.public_bundle(plan.galois_steps()))
    p = params.plain_modulus
    rng = np.random.default_rng(0)  # test inputs only
    weights = {
        # Every diagonal constant: plaintext products barely add noise.
        "ones": np.ones((D_IN, D_OUT), dtype=np.int64),
        # Full-size entries: each product multiplies the noise by ~N p.
        "random": rng.integers(-(p // 2), p // 2, (D_IN, D_OUT)),
    }
    inputs = [rng.integers(0, 2**12, D_IN) for _ in range(SAMPLES)]
    results = {}
    for name, W in weights.items():
        encoded = plan.encode_weights(server, W)
        results[name] = [(x, ct) for x in inputs for ct in plan.apply(server, encoded, client.encrypt(plan.pack_input(x)))]
    return client, server, plan, weights, results


def _budgets(client, server, results, flooded: bool) -> np.ndarray:
    zeros = np.zeros(server.slot_count, dtype=np.uint64)
    masked = [server.mask_for_client(ct, zeros) if flooded else server.add_plain(ct, zeros) for _, ct in results]
    return np.array([client.noise_budget(ct) for ct in masked])


def _same_c1(server, a, b) -> bool:
    """Whether two ciphertexts share their c1 (so a - b is transparent: SEAL
    refuses to produce it, or flags it)."""
    diff = server.copy(a)
    try:
        server.evaluator.sub_inplace(diff, b)
    except (RuntimeError, ValueError) as exc:
        if "transparent" in str(exc):
            return True
        raise
    return diff.is_transparent()


def test_client_cannot_test_a_guess_of_the_weights(setting):
    """The client holds its input ciphertexts and every evaluation key, so it
    can redo the server's computation for a guessed weight matrix. Masked the
    old way (c0 only), the result's c1 equals the recomputed one exactly when
    the guess is right (control); re-randomised, it never does."""
    client, server, plan, weights, results = setting
    zeros = np.zeros(server.slot_count, dtype=np.uint64)
    x, ct = results["random"][0]
    x_ct = client.encrypt(plan.pack_input(x))  # a fresh ciphertext of the same input...
    ct = plan.apply(server, plan.encode_weights(server, weights["random"]), x_ct)[0]  # ...that the server used
    old_way, flooded = server.add_plain(ct, zeros), server.mask_for_client(ct, zeros)
    for guess, right in (("random", True), ("ones", False)):
        recomputed = plan.apply(server, plan.encode_weights(server, weights[guess]), x_ct)[0]
        assert _same_c1(server, old_way, recomputed) is right  # control: the guess is tested
        # The result arrives mod-switched (fewer primes); the client can switch its recomputation too.
        server.evaluator.mod_switch_to_inplace(recomputed, server.result_parms_id)
        assert not _same_c1(server, flooded, recomputed)


def test_flooding_dominates_the_noise_whatever_the_weights(setting):
    """Unflooded, a result keeps 41+ bits of budget; flooded, every result has
    the flooding's noise (budget <= 2 bits, i.e. noise 2**39 or more times the
    computation's), the same for both weight matrices."""
    client, server, _, _, results = setting
    plain = {name: _budgets(client, server, r, flooded=False) for name, r in results.items()}
    flooded = {name: _budgets(client, server, r, flooded=True) for name, r in results.items()}
    assert min(b.min() for b in plain.values()) >= RESULT_STATISTICAL_BITS + 1, plain
    assert max(b.max() for b in flooded.values()) <= 2, flooded
    assert set(flooded["ones"].tolist()) == set(flooded["random"].tolist()), flooded


def test_flooded_results_still_decrypt_exactly(setting):
    client, server, plan, weights, results = setting
    p = server.p
    mask = np.random.default_rng(1).integers(0, p, server.slot_count, dtype=np.uint64)  # test input only
    for x, ct in results["random"][:2]:
        got = client.decrypt(server.mask_for_client(ct, mask))
        want = (client.decrypt(ct).astype(object) + mask.astype(object)) % p
        assert np.array_equal(got.astype(object), want)


def test_calibrated_attention_estimate_stays_at_or_below_the_real_budget():
    """The server refreshes cache blocks by its estimate of the attention
    results' budget (keeping them >= 41 bits for the flooding). With the
    client's measured slack the estimate is tight, and still never above the
    real budget, also for a half-full block with fresh values."""
    from cryptogen_hf.he import InnerKVCache
    from cryptogen_hf.he.attention import calibrate_attention_slack

    client = ClientHE(HEParams())
    client.noise_model.attention_slack = calibrate_attention_slack(client, 2, 32)
    assert client.noise_model.attention_slack >= 8  # the composed rules alone are far below
    cache = InnerKVCache(2, 32, client.params, client.noise_model)
    server = ServerHE.from_bundle(client.public_bundle(cache.galois_steps()))
    rng = np.random.default_rng(2)  # test inputs only
    p = client.p
    for t in range(cache.B // 2):
        slots = cache.pack_token(rng.integers(0, p, cache.d, dtype=np.uint64).astype(np.int64), t)
        cache.append(server, client.encrypt(slots), client.encrypt(slots))
    query = client.encrypt(cache.pack_query(rng.integers(0, p, cache.d, dtype=np.uint64).astype(np.int64)))
    measured = min(client.noise_budget(c) for c in cache.scores(server, query))
    estimate = cache.estimate_budget("scores")
    assert measured - 8 <= estimate <= measured, (estimate, measured)
    assert cache.blocks_needing_refresh() == []  # fresh appends keep 41+ bits: no refresh
