"""The encrypted cache's two layouts: the prompt stored "outer", generated tokens "inner".

The policy is checked on the shapes it was designed for (pure arithmetic), and
the outer path end to end through real server and client processes: logits
and greedy tokens equal plaintext, and crops into either part continue like
the cropped text.
"""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cryptogen_hf import SHIPPED_MODEL_DIR
from cryptogen_hf.config import CacheSettings, ConfigError, CryptoGenConfig, load_config
from cryptogen_hf.he import HEParams, InnerKVCache, OuterAttentionPlan
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM, EncryptedCache
from cryptogen_hf.families import ModelShape
from cryptogen_hf.protocol.decoder import PrefillLayoutPolicy
from cryptogen_hf.protocol.layouts import QKVIntoCache

PARAMS = HEParams()


def _shape(n_layer, d, heads, ctx, vocab):
    return ModelShape(family="gpt2", n_layer=n_layer, n_embd=d, n_head=heads, n_kv_head=heads, head_dim=d // heads, d_mlp=4 * d,
                      n_positions=ctx, vocab_size=vocab, norm_eps=1e-5)


GPT2_BASE = _shape(12, 768, 12, 1024, 50257)
SHIPPED = _shape(4, 192, 4, 512, 4096)


def test_auto_policy_picks_outer_only_where_it_is_cheaper():
    base = PrefillLayoutPolicy(GPT2_BASE, PARAMS, "auto")
    # GPT-2 base: 10 tokens per inner block, so a decode query over a long prompt
    # costs ~50 block products inner and a flat 2 x 64 outer.
    assert not base.use_outer(64) and not base.use_outer(128)
    assert base.use_outer(512)
    assert base.outer_seconds(512) < base.inner_seconds(512) / 1.3  # measured: 2.07 s against 4.32 s
    assert not base.use_outer(base.max_outer + 1)  # more than one outer tile holds
    assert base.galois_steps() == OuterAttentionPlan.galois_steps_up_to(12, 64, base.max_outer, PARAMS)
    # The shipped model: 42 tokens per inner block; outer never pays within 512 tokens,
    # so auto asks for no extra rotation keys.
    shipped = PrefillLayoutPolicy(SHIPPED, PARAMS, "auto")
    assert not shipped.may_use_outer() and shipped.galois_steps() == set()
    forced = PrefillLayoutPolicy(SHIPPED, PARAMS, "outer")
    assert forced.use_outer(2) and forced.use_outer(511) and not forced.use_outer(1)
    assert not PrefillLayoutPolicy(GPT2_BASE, PARAMS, "inner").use_outer(512)
    with pytest.raises(ValueError, match="prefill layout"):
        PrefillLayoutPolicy(SHIPPED, PARAMS, "diagonal")


def test_bad_prefill_layout_in_config_names_the_key():
    with pytest.raises(ConfigError, match="cache.prefill_layout"):
        CryptoGenConfig(cache=CacheSettings(prefill_layout="sideways")).validate()
    assert load_config("default").cache.prefill_layout == "auto"


def test_qkv_layout_places_every_part_where_the_server_reads_it():
    H, dh, T = 2, 8, 5
    inner = InnerKVCache(H, dh, PARAMS)
    outer = OuterAttentionPlan(H, dh, T, PARAMS)
    rng = np.random.default_rng(0)
    qkv = rng.integers(-1000, 1000, size=(T, 3, H * dh))
    io = QKVIntoCache(inner, 0, T, outer_query=outer, outer_store=outer)
    slots = io.pack_input(qkv.reshape(-1))
    parts = io.split(slots)
    assert [len(parts[k]) for k in ("q", "k", "v", "q_outer")] == [T, T, T, T]
    np.testing.assert_array_equal(parts["q_outer"][3], outer.pack_query(qkv[3, 0]))
    K = qkv[:, 1].reshape(T, H, dh)
    k_diag, k_nonzero = outer.pack_keys(K)
    for g, row in enumerate(parts["k_diag"]):
        for b, sent in enumerate(row):
            if sent is None:
                assert not k_diag[g, b].any()
            else:
                np.testing.assert_array_equal(sent, k_diag[g, b])
    assert sum(s is not None for row in parts["v_diag"] for s in row) == int(outer.key_value_nonzero()[1].sum())
    with pytest.raises(ValueError, match="more than the layout expects"):
        io.split(slots + [slots[0]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(4)  # chosen so that no greedy step below is a near-tie (top-2 gap >= 0.05)
    path = tmp_path_factory.mktemp("tiny-gpt2-outer")
    # A wider initialisation than GPT-2's default, so greedy tokens vary (a
    # near-uniform random model repeats one token, which would test little).
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=300,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


def _plain_greedy(plain, ids, n):
    """Plaintext greedy tokens, and a check that each step's choice is clear: a
    near-tie (top-2 logit gap below the secure path's error budget) would make
    token equality a coin toss rather than a test."""
    out = plain.generate(ids, max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True)
    gaps = [(lambda v: (v[0] - v[1]).item())(s[0].topk(2).values) for s in out.scores]
    assert min(gaps) > 0.05, f"test model has a near-tie: top-2 gaps {gaps}"
    return out


@pytest.mark.timeout(1200)
def test_prompt_stored_outer_generates_and_crops_like_plaintext(checkpoint):
    plain = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    settings = CryptoGenConfig(cache=CacheSettings(prefill_layout="outer"))
    model = CryptoGenForCausalLM.from_pretrained(checkpoint, settings=settings)
    try:
        prompt = torch.tensor([[5, 17, 250, 3, 9, 11, 40, 41, 42, 43]])
        cache = EncryptedCache(model)
        secure = model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        reference = _plain_greedy(plain, prompt, 4)
        assert secure.sequences.tolist() == reference.sequences.tolist()
        assert len(set(secure.sequences[0, 10:].tolist())) > 1, "the test model should not repeat one token"
        errors = [(s - r).abs().max().item() for s, r in zip(secure.scores, reference.scores)]
        assert max(errors) < 0.05, errors
        runner = model.session.runner
        assert runner.n_outer == 10 and runner.n_tokens == 13  # the prompt outer, 3 decoded tokens inner
        stats = model.session.stats()
        assert stats["passes"] == 4 and stats["tokens_processed"] == 13

        # Crop inside the inner part (the last kept inner block goes through the masked round trip).
        cache.crop(12 - cache.get_seq_length())  # 13 tokens -> 12
        kept = torch.cat([secure.sequences[:, :12], torch.tensor([[77]])], dim=1)
        continued = model.generate(kept, cache=cache, max_new_tokens=2, do_sample=False)
        assert continued.tolist() == _plain_greedy(plain, kept, 2).sequences.tolist()

        # Crop inside the prompt stored outer: its ciphertexts stay, later tokens are ignored.
        cache.crop(6 - cache.get_seq_length())
        assert runner.n_outer == 6 and model.session.stats()["tokens"] == 6
        kept = torch.cat([prompt[:, :6], torch.tensor([[123]])], dim=1)
        continued = model.generate(kept, cache=cache, max_new_tokens=2, do_sample=False)
        assert continued.tolist() == _plain_greedy(plain, kept, 2).sequences.tolist()

        # The benchmarks' cache fill: random encrypted keys and values in either layout.
        session = model.session
        for n, outer in ((40, True), (1, False)):
            session.reset()
            session.fill_for_benchmark(n)
            assert (runner.n_outer == n) is outer and session.stats()["tokens"] == n
            logits = session.forward([7], [True])
            assert logits.shape == (1, 300) and torch.isfinite(logits).all()
            assert session.stats()["tokens"] == n + 1
        with pytest.raises(ValueError, match="empty cache"):
            session.fill_for_benchmark(3)
    finally:
        model.close()


def test_shipped_model_keeps_its_default_layout_inner():
    policy = PrefillLayoutPolicy(ModelShape.from_dict({**SHIPPED.to_dict()}), PARAMS, load_config("default").cache.prefill_layout)
    assert SHIPPED_MODEL_DIR.exists()
    assert not any(policy.use_outer(n) for n in (32, 255, 511))
