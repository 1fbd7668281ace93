"""Tests for the shipped tiny GPT-2 and the sliding-window perplexity code.

Fast (a few seconds): one model load, a 2k-token perplexity, small toy checks.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cryptogen_hf
from cryptogen_hf.eval.perplexity import hf_model_fn, sliding_window_nll, window_spans

MODEL_DIR = Path(cryptogen_hf.SHIPPED_MODEL_DIR)
DATA = Path(cryptogen_hf.__file__).resolve().parent.parent.parent / "shared" / "data"
WIKITEXT_TEST = DATA / "wikitext-2" / "test.txt"

# Measured on the shipped checkpoint: first 2,000 tokens of WikiText-2 test,
# window 512, stride 256 -> ppl 72.86. The bound leaves a wide margin (numerics,
# thread counts, or a retrain under a different time budget never flake it) yet
# is far below the uniform baseline of 4096 and what an untrained model gives
# (a 40-step model scores ~450 here).
PPL_2K_BOUND = 120.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these small forward passes on one thread.

    The test machines are shared; with several busy processes, torch's
    multi-threaded kernels spend most of their time waiting on each other
    (measured: 10x slower than one thread). Restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    m.eval()
    return m


# ---------------------------------------------------------------- checkpoint


def test_checkpoint_files_present_and_small():
    for name in ["config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "README.md"]:
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total < 30 * 1024 * 1024, f"shipped model is {total / 1e6:.1f} MB"


def test_config_matches_documentation(model):
    cfg = model.config
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (4, 192, 4, 512)
    assert cfg.vocab_size == 4096
    assert cfg.activation_function == "gelu_new"
    # Tied embeddings, as GPT-2: the LM head is the token embedding matrix.
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.transformer.wte.weight.dtype == torch.float32


def test_tokenizer_special_tokens_and_round_trip(tok, model):
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == model.config.eos_token_id
    samples = [
        "The quick brown fox jumps over the lazy dog.",
        " = Homarus gammarus = \n It is n't a <unk> lobster , H. americanus @-@ like .\n",
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
        "  leading spaces, tabs\tand unicode: café, naïve, 漢字, 🙂  ",
    ]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s


# ---------------------------------------------------------------- perplexity


@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason=f"{WIKITEXT_TEST} not present")
def test_ppl_on_wikitext_slice_is_far_below_uniform(tok, model):
    # 2k tokens need ~10k characters; read a bit more and cut in tokens.
    text = WIKITEXT_TEST.read_text(encoding="utf-8")[:20_000]
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:2000]
    assert len(ids) == 2000
    res = sliding_window_nll(hf_model_fn(model), ids, window=512, stride=256)
    assert res.n_tokens == 1999
    assert res.ppl < PPL_2K_BOUND < model.config.vocab_size


def test_one_window_equals_full_sequence_loss(tok, model):
    text = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building , "
            "and the tallest structure in Paris . First Citizen : You are all resolved rather to die "
            "than to famish ? All : Resolved . resolved .")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = len(ids)
    assert 20 < n < 512
    with torch.no_grad():
        full = model(input_ids=ids[None], labels=ids[None]).loss.item() * (n - 1)
    for window, stride in [(512, 256), (n, 1), (n, n - 1)]:
        res = sliding_window_nll(hf_model_fn(model), ids, window=window, stride=stride)
        assert res.n_windows == 1
        assert res.n_tokens == n - 1
        assert res.nll_sum == pytest.approx(full, rel=1e-5)


def test_strided_windows_score_each_token_with_the_right_context(tok, model):
    """Reference: score every target separately with an explicit context.

    Target p is scored by the first window whose end exceeds p, with context
    ids[begin:p] where begin is that window's start. GPT-2 has absolute
    positions, so any off-by-one in the context start, the logit row or the
    target picked changes the number.
    """
    text = WIKITEXT_TEST.read_text(encoding="utf-8")[:3000] if WIKITEXT_TEST.is_file() else \
        "It was the best of times , it was the worst of times . " * 20
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"][:90])
    n, window, stride = len(ids), 32, 12  # 6 windows; last one is shorter than `window`
    expected = 0.0
    for p in range(1, n):
        k = 0
        while min(k * stride + window, n) <= p:
            k += 1
        begin = k * stride
        with torch.no_grad():
            logits = model(input_ids=ids[None, begin:p], use_cache=False).logits[0, -1]
        expected += F.cross_entropy(logits.double()[None], ids[p:p + 1]).item()
    res = sliding_window_nll(hf_model_fn(model), ids, window=window, stride=stride)
    assert res.n_tokens == n - 1
    assert res.nll_sum == pytest.approx(expected, rel=1e-5)
    # And striding does change the number versus (nearly) disjoint windows: context matters.
    disjoint = sliding_window_nll(hf_model_fn(model), ids, window=window, stride=window - 1)
    assert abs(disjoint.nll_sum - res.nll_sum) > 1e-3


def test_context_free_model_gives_same_nll_for_any_striding():
    """With a bigram model (logits depend only on the current token) every
    correct striding must give exactly the full-sequence NLL over N - 1 tokens;
    skipped or double-counted targets would change it."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 50, 1001
    table = torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
    ids = torch.randint(0, vocab, (n,), generator=g)

    def bigram_fn(x):
        return table[x]  # [1, T, V]

    full = F.cross_entropy(table[ids[:-1]], ids[1:], reduction="sum").item()
    for window, stride in [(n + 10, 256), (512, 256), (512, 511), (100, 37), (100, 99), (7, 1), (2, 1)]:
        res = sliding_window_nll(bigram_fn, ids, window=window, stride=stride)
        assert res.n_tokens == n - 1, (window, stride)
        assert res.nll_sum == pytest.approx(full, rel=1e-12), (window, stride)
        assert res.ppl == pytest.approx(math.exp(full / (n - 1)), rel=1e-12)


def test_window_spans_cover_each_target_once():
    for n, window, stride in [(10, 4, 2), (1000, 512, 256), (513, 512, 256), (5, 8, 3), (2, 2, 1), (50, 10, 9)]:
        seen = []
        for begin, end, first in window_spans(n, window, stride):
            assert 0 <= begin < first <= end <= n and end - begin <= window
            seen.extend(range(first, end))
        assert seen == list(range(1, n))
    for bad_stride in (16, 32, 0):  # >= window leaves a target without context; 0 never ends
        with pytest.raises(ValueError):
            list(window_spans(100, 16, bad_stride))
