"""The shipped tiny LLaMA through the secure protocol, against plaintext.

Two client processes, each with its own secure session (a real `cryptogen
serve` child process holds the weights), on ``cryptogen_hf/models/tiny-llama``:
RMSNorm, rotary positions on shares, grouped-query attention with shared
key/value heads in the encrypted cache, SwiGLU. One scores a text window in
one packed pass (its own attention on shares), the other generates greedily
through the encrypted cache. Every check compares with the plaintext HF
``LlamaForCausalLM``.
"""

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cryptogen_hf import SHIPPED_LLAMA_DIR
from cryptogen_hf.eval.perplexity import hf_model_fn, sliding_window_nll

# A prompt whose greedy continuation has no near-tie in plaintext (the top-2
# logit gap among allowed tokens exceeds twice the secure error at every step).
PROMPT = "The history of the city"
NEW_TOKENS = 3
WINDOW = 16
WIKITEXT_TEST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2" / "test.txt"
FALLBACK_TEXT = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building , "
                 "and the tallest structure in Paris . First Citizen : You are all resolved rather to die ")


def _window_ids(tokenizer) -> list[int]:
    text = WIKITEXT_TEST.read_text(encoding="utf-8")[:2000] if WIKITEXT_TEST.is_file() else FALLBACK_TEXT
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:WINDOW]


def _secure_worker(job: str) -> dict:
    """One client process, one secure session: ``job`` "window" scores a
    text window in one pass (logits at every position), "greedy" generates
    from PROMPT. Spawned, so that the two sessions share the machine (a
    secure step is half waiting for the peer)."""
    from cryptogen_hf.hf.modeling import CryptoGenForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_LLAMA_DIR)
    model = CryptoGenForCausalLM.from_pretrained(SHIPPED_LLAMA_DIR)
    try:
        result = {"shape": model.session.shape.to_dict()}
        if job == "window":
            ids = torch.tensor([_window_ids(tokenizer)])
            result["logits"] = model(ids, use_cache=False).logits[0]
        else:
            ids = tokenizer(PROMPT, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
            result.update(ids=ids, sequences=out.sequences, logits=torch.cat(out.logits))
        return result
    finally:
        model.close()


@pytest.fixture(scope="module")
def secure_runs():
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        window, greedy = pool.map(_secure_worker, ["window", "greedy"])
    return {"window": window, "greedy": greedy}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SHIPPED_LLAMA_DIR)


@pytest.fixture(scope="module")
def plain():
    return AutoModelForCausalLM.from_pretrained(SHIPPED_LLAMA_DIR).eval()


def _clear_lead(plain, reference: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """Per row: does the plaintext's top logit lead the runner-up among the
    tokens generate() may pick by more than twice the secure error? Then the
    same argmax follows from the error bound, not from luck."""
    allowed = reference.clone()
    for word in plain.generation_config.bad_words_ids or []:
        allowed[:, word[0]] = float("-inf")
    top2 = allowed.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) > 2 * errors


def test_shipped_llama_is_a_grouped_query_llama(plain, secure_runs):
    config = plain.config
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads
    assert sum(p.stat().st_size for p in Path(SHIPPED_LLAMA_DIR).rglob("*") if p.is_file()) < 30 * 2**20
    shape = secure_runs["greedy"]["shape"]
    assert (shape["family"], shape["n_head"], shape["n_kv_head"]) == ("llama", config.num_attention_heads, config.num_key_value_heads)
    assert len(shape["rope_inv_freq"]) == shape["head_dim"] // 2


def test_greedy_generation_is_token_identical_to_plaintext(secure_runs, plain):
    run = secure_runs["greedy"]
    ids, sequences = run["ids"], run["sequences"]
    with torch.no_grad():
        expected = plain.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
        reference = plain(sequences).logits[0, ids.shape[1] - 1 : -1].double()
    assert sequences.tolist() == expected.tolist()
    errors = (run["logits"].double() - reference).abs().amax(dim=-1)
    print(json.dumps({"max_abs_logit_error": errors.tolist()}))
    assert errors.max().item() < 0.1, errors.max().item()
    assert bool(_clear_lead(plain, reference, errors).all()), errors.tolist()


def test_packed_window_perplexity_within_one_percent_and_same_argmax(secure_runs, plain, tokenizer):
    """One packed 16-token pass: perplexity of the window within 1 % of the
    plaintext's, and the same next-token argmax at every position whose
    plaintext lead is clear."""
    ids = _window_ids(tokenizer)
    secure_logits = secure_runs["window"]["logits"].double()
    with torch.no_grad():
        reference = plain(torch.tensor([ids])).logits[0].double()
    secure_nll = sliding_window_nll(lambda _: secure_logits, ids, window=WINDOW, stride=WINDOW - 1)
    plain_nll = sliding_window_nll(hf_model_fn(plain), ids, window=WINDOW, stride=WINDOW - 1)
    print(json.dumps({"secure_ppl": secure_nll.ppl, "plaintext_ppl": plain_nll.ppl,
                      "max_abs_logit_error": (secure_logits - reference).abs().max().item()}))
    assert secure_nll.n_tokens == plain_nll.n_tokens == WINDOW - 1
    assert plain_nll.ppl < 0.5 * len(tokenizer)  # far from uniform: the comparison can tell
    assert abs(secure_nll.ppl - plain_nll.ppl) / plain_nll.ppl < 0.01, (secure_nll.ppl, plain_nll.ppl)
    errors = (secure_logits - reference).abs().amax(dim=-1)
    clear = _clear_lead(plain, reference, errors)
    assert clear.sum() >= WINDOW // 2  # most positions are decided by the bound
    assert torch.equal(secure_logits.argmax(-1)[clear], reference.argmax(-1)[clear])
