"""Exactness and safety tests of the BFV kernels (small shapes, one 768x768)."""

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from cryptogen_hf.he import (
    CiphertextError, ClientHE, HEParams, InnerKVCache, MatvecPlan,
    OuterAttentionPlan, OuterKVCache, ServerHE,
)
from cryptogen_hf.he.matvec import SplitMatvecPlan, matvec_plan

H, DH, T_OUT, T_IN = 4, 48, 40, 45  # small model: d = 192


@pytest.fixture(scope="module")
def setup():
    params = HEParams()
    client = ClientHE(params)
    plans = {
        "mv_small": MatvecPlan(192, 576, params),
        "mv_768": MatvecPlan(768, 768, params),
        "mv_tall": MatvecPlan(192, 4096, params),
        "packed_small": MatvecPlan(192, 576, params, tokens=16),
        "packed_tall": MatvecPlan(768, 192, params, tokens=8),
        "split_wide": matvec_plan(5000, 192, params),  # wider than a row (4096): split in chunks
        "outer": OuterAttentionPlan(H, DH, T_OUT, params),
    }
    inner = InnerKVCache(H, DH, params)
    steps = set().union(*[p.galois_steps() for p in plans.values()]) | inner.galois_steps()
    bundle = client.public_bundle(steps)
    server = ServerHE.from_bundle(bundle)
    return params, client, server, plans, bundle


def centred(v, p):
    v = np.mod(v, p)
    return np.where(v > p // 2, v - p, v)


def test_params_security_and_fingerprint():
    params = HEParams()
    assert params.plain_modulus % (2 * params.poly_modulus_degree) == 1
    assert params.fingerprint() == HEParams.from_dict(params.to_dict()).fingerprint()
    with pytest.raises(ValueError):
        HEParams(coeff_modulus=[m.value() for m in sealapi.CoeffModulus.Create(8192, [60] * 5)])
    # The shipped chain: four primes of the sizes asked for, within the
    # 128-bit bound, the key-switching prime the largest; a bad size is refused.
    assert params.coeff_modulus_bits == (54, 54, 54, 56)
    assert sum(params.coeff_modulus_bits) <= sealapi.CoeffModulus.MaxBitCount(8192, sealapi.SEC_LEVEL_TYPE.TC128)
    assert len(set(params.coeff_modulus)) == 4
    assert HEParams(coeff_modulus_bits=(43, 43, 44, 44, 44)).fingerprint() != params.fingerprint()
    with pytest.raises(ValueError, match="20..60"):
        HEParams(coeff_modulus_bits=(54, 54, 54, 70))
    # The shipped config names the same chain, and a bad one is refused at load.
    from cryptogen_hf.config import ConfigError, CryptoGenConfig, HESettings, load_config

    assert tuple(load_config("default").he.coeff_modulus_bits) == params.coeff_modulus_bits
    with pytest.raises(ConfigError, match="he.coeff_modulus_bits"):
        CryptoGenConfig(he=HESettings(coeff_modulus_bits=[218])).validate()


def test_bundle_for_other_parameters_is_refused_and_sized(setup):
    """A bundle made for other parameters is refused from its header, before
    any SEAL object is built from it; a real bundle fits the server's limit."""
    from cryptogen_hf.he.keys import bundle_size_limit

    params, _, server, _, bundle = setup
    other = ClientHE(HEParams(plain_modulus_bits=40)).public_bundle([1])
    with pytest.raises(ValueError, match="differ from the handshake"):
        ServerHE.from_bundle(other, expect_fingerprint=params.fingerprint())
    assert ServerHE.from_bundle(bundle, expect_fingerprint=params.fingerprint()).params.fingerprint() == params.fingerprint()
    assert len(bundle) <= bundle_size_limit(params, len(server.galois_steps))


def test_encrypt_decrypt_negative(setup):
    params, client, *_ = setup
    x = np.array([-5, 0, 7, -(params.plain_modulus // 2)])
    got = client.decrypt(client.encrypt(x))
    assert np.array_equal(got[:4], np.mod(x, params.plain_modulus).astype(np.uint64))
    assert not got[4:].any()


@pytest.mark.parametrize("name,shape", [("mv_small", (192, 576)), ("mv_768", (768, 768)), ("mv_tall", (192, 4096))])
def test_decode_matvec_exact(setup, name, shape):
    params, client, server, plans, _ = setup
    plan, rng = plans[name], np.random.default_rng(1)
    W = rng.integers(-8192, 8192, shape)
    x = rng.integers(-8192, 8192, shape[0])
    enc = plan.encode_weights(server, W)
    outs = plan.apply(server, enc, client.encrypt(plan.pack_input(x)))
    y = plan.unpack_output([client.decrypt(o) for o in outs])
    assert np.array_equal(y.astype(np.int64), np.mod(x @ W, params.plain_modulus))
    est = plan.estimate_budget(server.noise_model, server.noise_model.fresh)
    assert est <= min(client.noise_budget(o) for o in outs)


@pytest.mark.parametrize("name,shape,rows", [("packed_small", (192, 576), 16), ("packed_small", (192, 576), 5), ("packed_tall", (768, 192), 8)])
def test_packed_matvec_exact(setup, name, shape, rows):
    """Several tokens per ciphertext (a full one and a partly empty one): each
    token's row comes out exactly x @ W, and the noise estimate is safe."""
    params, client, server, plans, _ = setup
    plan, rng = plans[name], np.random.default_rng(2)
    assert plan.tokens > 1 and plan.n_tiles >= 1
    W, X = rng.integers(-8192, 8192, shape), rng.integers(-8192, 8192, (rows, shape[0]))
    outs = plan.apply(server, plan.encode_weights(server, W), client.encrypt(plan.pack_rows(X)))
    Y = plan.unpack_rows([client.decrypt_centered(o) for o in outs])
    assert np.array_equal(Y[:rows], X @ W)
    assert not Y[rows:].any()  # empty token regions give zeros
    est = plan.estimate_budget(server.noise_model, server.noise_model.fresh)
    assert est <= min(client.noise_budget(o) for o in outs)


@pytest.mark.parametrize("heads,rows,inner,cols", [(4, 37, 48, 37), (12, 20, 64, 33)])
def test_column_product_exact_with_uniform_operands(setup, heads, rows, inner, cols):
    """Enc(A) @ B per head, with both operands uniform in Z_p (masked shares, as
    in a prompt's attention): exact mod p, partly empty segments included, and
    the noise estimate is safe."""
    from cryptogen_hf.he.columns import ColumnProductPlan

    params, client, server, *_ = setup
    p, rng = params.plain_modulus, np.random.default_rng(4)
    plan = ColumnProductPlan(heads, rows, inner, cols, params)
    A = rng.integers(0, p, (heads, rows, inner), dtype=np.uint64)
    B = rng.integers(0, p, (heads, inner, cols), dtype=np.uint64)
    outs = plan.apply(server, [client.encrypt(v) for v in plan.pack_input(A.astype(np.int64))], B.astype(np.int64))
    Y = plan.unpack_output([client.decrypt(o) for o in outs]).astype(object)
    assert (Y == np.einsum("hri,hic->hrc", A.astype(object), B.astype(object)) % p).all()
    assert plan.estimate_budget(server.noise_model, server.noise_model.fresh) <= min(client.noise_budget(o) for o in outs)


def test_split_matvec_exact_for_inputs_wider_than_a_row(setup):
    """An input wider than a row goes in as two ciphertexts whose products add up: exactly x @ W."""
    params, client, server, plans, _ = setup
    plan, rng = plans["split_wide"], np.random.default_rng(3)
    assert isinstance(plan, SplitMatvecPlan) and plan.n_inputs == 2
    W, x = rng.integers(-8192, 8192, (5000, 192)), rng.integers(-8192, 8192, 5000)
    cts = [client.encrypt(v) for v in plan.pack_rows(x[None])]
    outs = plan.apply_all(server, plan.encode_weights(server, W), cts)
    assert len(outs) == plan.n_tiles
    assert np.array_equal(plan.unpack_rows([client.decrypt_centered(o) for o in outs])[0], x @ W)
    assert plan.estimate_budget(server.noise_model, server.noise_model.fresh) <= min(client.noise_budget(o) for o in outs)


def test_packed_plan_refuses_bad_token_counts():
    params = HEParams()
    with pytest.raises(ValueError, match="tokens per ciphertext"):
        MatvecPlan(192, 192, params, tokens=3)
    with pytest.raises(ValueError, match="tokens per ciphertext"):
        MatvecPlan(768, 192, params, tokens=16)  # 8 regions of 512 < 768 per row


def test_server_bundle_cannot_decrypt(setup):
    params, client, server, _, bundle = setup
    assert not hasattr(server, "decryptor") and not hasattr(server, "_secret_key")
    # the secret key's serialization (its key material) is not in the bundle
    sk = client.secret_key_bytes()
    assert sk[-4096:] not in bundle and sk[len(sk) // 2 : len(sk) // 2 + 256] not in bundle
    # a fresh unrelated key (all a server could make) decrypts to garbage
    x = np.arange(100)
    ct = server.encrypt(x)
    other = sealapi.KeyGenerator(server.context)
    dec = sealapi.Decryptor(server.context, other.secret_key())
    pt = sealapi.Plaintext()
    dec.decrypt(ct, pt)
    assert not np.array_equal(np.asarray(server.encoder.decode_uint64(pt))[:100], x)
    assert np.array_equal(client.decrypt(ct)[:100], x)  # the client's key does


def test_corrupted_ciphertext_bytes(setup):
    params, client, server, *_ = setup
    data = server.serialize_ct(client.encrypt(np.arange(10)))
    assert np.array_equal(client.decrypt(server.load_ct(data))[:10], np.arange(10))
    with pytest.raises(CiphertextError):
        server.load_ct(data[: len(data) // 2])
    bad = bytearray(data)
    bad[40:80] = b"\xff" * 40
    with pytest.raises(CiphertextError):
        server.load_ct(bytes(bad))
    with pytest.raises(CiphertextError):
        server.load_ct(b"garbage")


def test_uploads_are_seeded_and_results_come_one_prime_lower(setup):
    """What crosses the wire is smaller, not weaker: the client's uploads are
    seeded symmetric encryptions (c1 as a seed: about half the bytes) and the
    server's results are mod-switched to two of the three data primes (about
    two thirds); both decrypt exactly, and each side accepts only its level."""
    params, client, server, *_ = setup
    x = np.arange(params.slot_count) % 5000
    public_key_bytes = server.serialize_ct(client.encrypt(x))
    upload = client.encrypt_serialized(x)
    assert len(upload) < 0.55 * len(public_key_bytes)
    received = server.load_ct(upload)
    assert np.array_equal(client.decrypt(received), x)

    mask = np.full(params.slot_count, 7, dtype=np.uint64)
    result = server.serialize_ct(server.mask_for_client(received, mask))
    assert len(result) < 0.7 * len(public_key_bytes)
    assert np.array_equal(client.decrypt(client.load_ct(result)), (x + 7) % params.plain_modulus)
    with pytest.raises(CiphertextError, match="unexpected modulus level"):
        client.load_ct(public_key_bytes)  # a data-level ciphertext is not a result
    with pytest.raises(CiphertextError, match="unexpected modulus level"):
        server.load_ct(result)  # nor is a result an upload


def test_outer_attention_exact(setup):
    params, client, server, plans, _ = setup
    plan, rng, p = plans["outer"], np.random.default_rng(4), params.plain_modulus
    K, V = rng.integers(-4096, 4096, (T_OUT, H, DH)), rng.integers(-4096, 4096, (T_OUT, H, DH))
    q, pr = rng.integers(-4096, 4096, (H, DH)), rng.integers(0, 4096, (H, T_OUT))
    Dk, nk = plan.pack_keys(K)
    Dv, nv = plan.pack_values(V)
    enc = lambda D, nz: [[client.encrypt(D[g, b]) if nz[g, b] else None for b in range(D.shape[1])] for g in range(D.shape[0])]
    cache = OuterKVCache(plan, enc(Dk, nk), enc(Dv, nv), server.noise_model.fresh)
    assert cache.n_tokens == T_OUT and cache.nbytes > 0 and not cache.needs_refresh(20)
    s = plan.scores(server, cache, client.encrypt(plan.pack_query(q)))
    o = plan.attend(server, cache, client.encrypt(plan.pack_probs(pr)))
    assert np.array_equal(plan.unpack_scores(client.decrypt_centered(s)), centred(np.einsum("hj,thj->ht", q, K), p))
    assert np.array_equal(plan.unpack_out(client.decrypt_centered(o)), centred(np.einsum("ht,thj->hj", pr, V), p))
    m = server.noise_model
    assert plan.estimate_budget(m, m.fresh, "scores") <= client.noise_budget(s)
    assert plan.estimate_budget(m, m.fresh, "out") <= client.noise_budget(o)


def test_inner_cache_append_and_attention(setup):
    params, client, server, *_ = setup
    rng, p = np.random.default_rng(5), params.plain_modulus
    cache = InnerKVCache(H, DH, params, server.noise_model)
    assert cache.B == 42
    K, V = rng.integers(-4096, 4096, (T_IN, H, DH)), rng.integers(-4096, 4096, (T_IN, H, DH))
    for t in range(T_IN):
        if t == T_IN - 1:  # last token "computed at the server": garbage outside its slots
            junk = rng.integers(0, p, params.slot_count)
            kk, vv = cache.pack_token(K[t], t), cache.pack_token(V[t], t)
            o = cache.slot_offset(t)
            junk_k, junk_v = junk.copy(), junk.copy()
            junk_k[o : o + cache.d], junk_v[o : o + cache.d] = kk[o : o + cache.d], vv[o : o + cache.d]
            cache.append_masked(server, client.encrypt(junk_k), client.encrypt(junk_v))
        else:
            cache.append(server, client.encrypt(cache.pack_token(K[t], t)), client.encrypt(cache.pack_token(V[t], t)))
    assert cache.n_tokens == T_IN and len(cache.k_cts) == 2
    # tokens sit at the right slots (row-aware offsets), zeros elsewhere in the first block
    blk0 = client.decrypt_centered(cache.k_cts[0])
    expect = np.zeros(params.slot_count, dtype=np.int64)
    for t in range(42):
        o = cache.slot_offset(t)
        expect[o : o + cache.d] = K[t].reshape(-1)
    assert np.array_equal(blk0, expect)
    assert cache.slot_offset(21) == params.row_size
    # estimates are conservative
    for ct, est in zip(cache.k_cts, cache.est_budget):
        assert est <= client.noise_budget(ct)
    # The masked (server-side) append cost a full ct x pt: block 1 no longer has
    # room for a ct x ct product, and the estimate says so -> lazy refresh
    # (in the protocol: server masks, client decrypts + re-encrypts, server unmasks).
    need = server.noise_model.mul + 20
    assert cache.needs_refresh(need)
    for i, b in enumerate(cache.est_budget):
        if b < need:
            cache.replace_block(i, client.encrypt(client.decrypt(cache.k_cts[i])), client.encrypt(client.decrypt(cache.v_cts[i])))
    assert not cache.needs_refresh(need)
    q, pr = rng.integers(-4096, 4096, (H, DH)), rng.integers(0, 4096, (H, T_IN))
    ss = cache.scores(server, client.encrypt(cache.pack_query(q)))
    S = cache.unpack_scores([client.decrypt_centered(x) for x in ss])
    assert np.array_equal(S, centred(np.einsum("hj,thj->ht", q, K), p))
    out = cache.attend(server, [client.encrypt(x) for x in cache.pack_probs(pr)])
    assert np.array_equal(cache.unpack_out(client.decrypt_centered(out)), centred(np.einsum("ht,thj->hj", pr, V), p))
    assert cache.estimate_budget("scores") <= min(client.noise_budget(x) for x in ss)
    assert cache.estimate_budget("out") <= client.noise_budget(out)
    assert not cache.needs_refresh(20) and cache.needs_refresh(1000)
