"""The shipped tiny LLaMA through the secure protocol, against plaintext.

One secure session (a real `cryptogen serve` child process holds the weights;
this test process is the client) on ``cryptogen_hf/models/tiny-llama``:
RMSNorm, rotary positions on shares, grouped-query attention with shared
key/value heads in the encrypted cache, SwiGLU. Every check compares with
the plaintext HF ``LlamaForCausalLM``.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cryptogen_hf import SHIPPED_LLAMA_DIR
from cryptogen_hf.eval.perplexity import hf_model_fn, sliding_window_nll
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM

# Prompts whose greedy continuation has no near-tie in plaintext (the top-2
# logit gap among allowed tokens exceeds twice the secure error at every step).
PROMPTS = ["The history of the city", "He was born in"]
NEW_TOKENS = 3
WIKITEXT_TEST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2" / "test.txt"
FALLBACK_TEXT = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building , "
                 "and the tallest structure in Paris . First Citizen : You are all resolved rather to die ")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SHIPPED_LLAMA_DIR)


@pytest.fixture(scope="module")
def plain():
    return AutoModelForCausalLM.from_pretrained(SHIPPED_LLAMA_DIR).eval()


@pytest.fixture(scope="module")
def secure():
    model = CryptoGenForCausalLM.from_pretrained(SHIPPED_LLAMA_DIR)
    yield model
    model.close()


def test_shipped_llama_is_grouped_query_llama(plain, secure):
    config = plain.config
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads
    total = sum(p.stat().st_size for p in Path(SHIPPED_LLAMA_DIR).rglob("*") if p.is_file())
    assert total < 30 * 2**20
    shape = secure.session.shape
    assert (shape.family, shape.n_head, shape.n_kv_head) == ("llama", config.num_attention_heads, config.num_key_value_heads)
    assert len(shape.rope_inv_freq) == shape.head_dim // 2


@pytest.mark.timeout(900)
def test_greedy_generation_is_token_identical_to_plaintext(secure, plain, tokenizer):
    report = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = secure.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            expected = plain.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
            reference = plain(out.sequences).logits[0, ids.shape[1] - 1 : -1].double()
        assert out.sequences.tolist() == expected.tolist(), f"prompt {prompt!r} diverged"
        errors = (torch.cat(out.logits).double() - reference).abs().amax(dim=-1)
        allowed = reference.clone()  # the tokens generate() may pick: the checkpoint bans some
        for word in plain.generation_config.bad_words_ids or []:
            allowed[:, word[0]] = float("-inf")
        top2 = allowed.topk(2, dim=-1).values
        gaps = top2[:, 0] - top2[:, 1]
        report.append({"prompt": prompt, "max_abs_logit_error": [round(e, 5) for e in errors.tolist()],
                       "top2_gap": [round(g, 4) for g in gaps.tolist()]})
        assert errors.max().item() < 0.1, errors.max().item()
        # No token is right by luck: the plaintext lead exceeds twice the secure error at every step.
        assert bool((gaps > 2 * errors).all()), (prompt, gaps.tolist(), errors.tolist())
    print(json.dumps(report))


@pytest.mark.timeout(900)
def test_secure_perplexity_within_one_percent_on_a_slice(secure, plain, tokenizer):
    """A packed 24-token window (its own attention on shares), logits at every position."""
    text = WIKITEXT_TEST.read_text(encoding="utf-8")[:2000] if WIKITEXT_TEST.is_file() else FALLBACK_TEXT
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:24]
    secure_nll = sliding_window_nll(hf_model_fn(secure), ids, window=24, stride=23)
    plain_nll = sliding_window_nll(hf_model_fn(plain), ids, window=24, stride=23)
    assert secure_nll.n_tokens == plain_nll.n_tokens == 23
    assert plain_nll.ppl < 0.5 * len(tokenizer)  # far from uniform: the comparison can tell
    print(json.dumps({"secure_ppl": secure_nll.ppl, "plaintext_ppl": plain_nll.ppl}))
    assert abs(secure_nll.ppl - plain_nll.ppl) / plain_nll.ppl < 0.01, (secure_nll.ppl, plain_nll.ppl)
