"""Tensor-parallel HE (server/he_workers.py): a session's HE products split
over forked helper processes give the very ciphertexts of one process, follow
every change to the encrypted cache, share the weights instead of copying
them, and fail clearly when a helper dies or hangs.

The end-to-end check (a real session with two HE workers, token-identical to
plaintext) is test_secure_generate.py's ``secure_model``, which runs with
``server.he_workers = 2`` and every product split."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from cryptogen_hf import SHIPPED_MODEL_DIR
from cryptogen_hf.config import load_config
from cryptogen_hf.he import ClientHE, InnerKVCache, OuterAttentionPlan, OuterKVCache, ServerHE
from cryptogen_hf.protocol.decoder import PrefillLayoutPolicy
from cryptogen_hf.server.he_workers import HEWorkerError, HEWorkers
from cryptogen_hf.server.serve import load_hosted_model


@pytest.fixture(scope="module")
def hosted():
    return load_hosted_model(SHIPPED_MODEL_DIR, load_config(None), progress=False)


@pytest.fixture(scope="module")
def keys(hosted):
    client = ClientHE(hosted.he_params)
    steps = set(hosted.plans.galois_steps()) | PrefillLayoutPolicy(hosted.shape, hosted.he_params).galois_steps()
    return client, ServerHE.from_bundle(client.public_bundle(sorted(steps)))


@pytest.fixture(scope="module")
def pools(hosted, keys):
    """One, two and three workers, splitting every product (min_split_seconds=0)."""
    server = keys[1]
    made = {n: HEWorkers(server, hosted.encoded, hosted.plans, n, timeout_s=60, min_split_seconds=0.0) for n in (1, 2, 3)}
    yield made
    for n in (3, 2):  # the later pool's helpers hold copies of the earlier one's sockets
        made[n].close()


def _random_ct(server, rng):
    return server.encrypt(rng.integers(0, 1 << 20, server.slot_count))


def _bytes(server, cts) -> list[bytes]:
    return [server.serialize_ct(ct) for ct in cts]


def test_split_products_are_the_ciphertexts_of_one_process(hosted, keys, pools):
    server = keys[1]
    rng = np.random.default_rng(0)
    products = [(("embed",), hosted.plans.embed_chunks), (("lm_head",), 1)]
    for name, enc in hosted.encoded.blocks[1].items():
        products.append((("linear", 1, name, "decode"), 1))
        if enc.verify_plan is not None:
            products.append((("linear", 1, name, "verify"), 1))
    assert any(key[-1] == "verify" for key, _ in products)
    for key, n_cts in products:
        cts = [_random_ct(server, rng) for _ in range(n_cts)]
        one = _bytes(server, pools[1].matvec(key, cts))
        for n in (2, 3):
            assert _bytes(server, pools[n].matvec(key, cts)) == one, (key, n)


def _attention(server, pool, cache, layer, queries, probs):
    scores = pool.scores(layer, cache, queries)
    return [_bytes(server, row) for row in scores], _bytes(server, pool.attend(layer, cache, probs))


def test_split_attention_follows_every_change_to_the_cache(hosted, keys, pools):
    client, server = keys
    rng = np.random.default_rng(1)
    layout = hosted.plans.cache_layout
    cache = InnerKVCache(layout.H, layout.dh, hosted.he_params, client.noise_model)

    def append(n_tokens):
        for _ in range(n_tokens):
            cache.append(server, _random_ct(server, rng), _random_ct(server, rng))

    def inputs():  # (encryption is randomised: the same ciphertexts go to each pool)
        return [_random_ct(server, rng) for _ in range(2)], [[_random_ct(server, rng) for _ in cache.k_cts] for _ in range(2)]

    def same_everywhere(step, worker_counts=(2,)):
        queries, probs = inputs()
        one = _attention(server, pools[1], cache, 0, queries, probs)
        for n in worker_counts:
            assert _attention(server, pools[n], cache, 0, queries, probs) == one, (step, n)

    blocks = [_random_ct(server, rng) for _ in range(12)]
    cache.load_blocks(blocks[:6], blocks[6:], 5 * layout.B + 3)  # six blocks: each worker owns two (three workers) or three (two)
    same_everywhere(0, worker_counts=(2, 3))
    append(1)  # the last block changes
    same_everywhere(1)
    cache.replace_block(2, _random_ct(server, rng), _random_ct(server, rng))  # a refresh
    same_everywhere(2)
    cache.truncate(2 * layout.B + 1)  # a crop: three blocks left
    same_everywhere(3)
    append(layout.B)  # grows again past the crop
    same_everywhere(4)
    # Control: a block changed behind the cache's back (no new version) is
    # not sent again, so the helpers compute with their stale copy and the
    # results differ: the comparisons above can fail.
    owned_by_helper = 1
    server.evaluator.add_inplace(cache.k_cts[owned_by_helper], _random_ct(server, rng))
    queries, probs = inputs()
    assert _attention(server, pools[2], cache, 0, queries, probs)[0] != _attention(server, pools[1], cache, 0, queries, probs)[0]


def _outer_cache(server, hosted, n_tokens, rng):
    """A prompt's outer part of random diagonals (None where the layout has an all-zero one)."""
    layout = hosted.plans.cache_layout
    plan = OuterAttentionPlan(layout.H, layout.dh, n_tokens, hosted.he_params)
    k_nonzero, v_nonzero = plan.key_value_nonzero()
    k_diag, v_diag = ([[_random_ct(server, rng) if nz[g, b] else None for b in range(nz.shape[1])] for g in range(nz.shape[0])]
                      for nz in (k_nonzero, v_nonzero))
    return OuterKVCache(plan, k_diag, v_diag, fresh_budget=100.0)


def test_split_outer_attention_matches_one_process_for_each_new_prompt(hosted, keys, pools):
    server = keys[1]
    rng = np.random.default_rng(4)

    def outer_products(pool, cache, inputs):
        queries, probs = inputs
        return _bytes(server, pool.outer(3, cache, "scores", queries)), _bytes(server, pool.outer(3, cache, "attend", probs))

    def inputs():
        return [_random_ct(server, rng)], [_random_ct(server, rng)]

    for n_tokens in (60, 30):  # a second conversation replaces the first's outer part
        cache = _outer_cache(server, hosted, n_tokens, rng)
        if n_tokens == 60:
            pools[2].place_outer(3, cache)  # as a prompt's pass does; else at first use
        same_inputs = inputs()
        assert outer_products(pools[2], cache, same_inputs) == outer_products(pools[1], cache, same_inputs), n_tokens
    # Control: a diagonal changed without a new version is not sent again: results differ.
    stale = next(ct for row in cache.k_diag[::-1] for ct in row if ct is not None)  # a helper's giant step
    server.evaluator.add_inplace(stale, _random_ct(server, rng))
    same_inputs = inputs()
    assert outer_products(pools[2], cache, same_inputs)[0] != outer_products(pools[1], cache, same_inputs)[0]


def test_helpers_share_the_weights_instead_of_copying_them(hosted, keys):
    server = keys[1]
    pool = HEWorkers(server, hosted.encoded, hosted.plans, 2, timeout_s=60, min_split_seconds=0.0)
    try:
        pool.matvec(("lm_head",), [_random_ct(server, np.random.default_rng(2))])
        pool.matvec(("linear", 0, "fc_in", "decode"), [_random_ct(server, np.random.default_rng(2))])
        helper = pool.memory_kib()[0]
    finally:
        pool.close()
    weights_kib = sum(
        pt.coeff_count() * 8 for enc in [hosted.encoded.lm_head, *hosted.encoded.blocks[0].values()]
        for tile in enc.weights for row in tile for pt in row if pt is not None
    ) * len(hosted.encoded.blocks) // 1024
    # What the helper holds alone is a small fraction of the weights it computes with.
    assert weights_kib > 20_000
    print(json.dumps({"helper_kib": helper, "weights_kib": weights_kib}))
    assert helper["private"] < 0.25 * weights_kib, (helper, weights_kib)


def test_a_helper_that_dies_or_hangs_fails_with_an_error_that_names_it(hosted, keys):
    server = keys[1]
    ct = [_random_ct(server, np.random.default_rng(3))]
    pool = HEWorkers(server, hosted.encoded, hosted.plans, 3, timeout_s=2, min_split_seconds=0.0)
    try:
        (first, _), (second, _) = pool.helpers
        os.kill(second, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(HEWorkerError, match="HE worker 2 .* did not answer in time"):
            pool.matvec(("lm_head",), ct)
        assert time.monotonic() - start < 10
        os.kill(first, signal.SIGKILL)
        with pytest.raises(HEWorkerError, match="HE worker 1 .*stopped"):
            pool.matvec(("lm_head",), ct)
    finally:
        os.kill(second, signal.SIGCONT)  # (else close() waits 5 s before it kills it)
        pool.close()
    for pid, _ in [(first, None), (second, None)]:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: no helper outlives its session
