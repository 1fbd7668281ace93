"""generate() as a transformers user calls it: every option is right or refused by name.

Most checks run the model on a PLAINTEXT stand-in for the session
(tests/plaintext_standin.py: HF plumbing only, nothing secure); the last ones
go through a real server over TLS.
"""

import copy
import json

import pytest
import torch
from conftest import start_server, stop_server
from plaintext_standin import PlaintextStandInSession
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel

from cryptogen_hf.config import CryptoGenConfig, GenerationSettings, MPCSettings
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM, EncryptedCache
from cryptogen_hf.families import UnsupportedArchitectureError, family_for_config


@pytest.fixture()
def checkpoint(tmp_path):
    """A tiny GPT-2 whose EOS is 7 (not GPT-2's 50256) and with a generation_config.json."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64, bos_token_id=7, eos_token_id=7)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path)
    GenerationConfig(bos_token_id=7, eos_token_id=7, pad_token_id=7, max_new_tokens=3).save_pretrained(tmp_path)
    return tmp_path


def _standin_model(checkpoint, **settings):
    return CryptoGenForCausalLM.from_session(PlaintextStandInSession(checkpoint, CryptoGenConfig(**settings)))


@pytest.mark.parametrize("options, named", [
    ({"use_cache": False}, "use_cache=False"),
    ({"num_beams": 2}, "num_beams=2"),
    ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions=True"),
    ({"output_hidden_states": True, "return_dict_in_generate": True}, "output_hidden_states=True"),
])
def test_options_the_secure_model_cannot_honour_are_refused_by_name_before_any_work(checkpoint, options, named):
    model = _standin_model(checkpoint)
    with pytest.raises(ValueError, match=f"does not support {named}"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, **options)
    assert model.session.passes == []  # refused before the first pass


def test_token_only_reveal_samples_inside_mpc_and_refuses_processors_that_need_logits(checkpoint):
    model = _standin_model(checkpoint, mpc=MPCSettings(reveal="token"))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"cannot run: TopKLogitsWarper \(from top_k\)\..*top_k=0"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.7)  # transformers' top_k=50
    with pytest.raises(ValueError, match=r"RepetitionPenaltyLogitsProcessor \(from repetition_penalty\)"):
        model.generate(ids, max_new_tokens=2, do_sample=False, repetition_penalty=1.3)
    assert model.session.passes == []
    out = model.generate(ids, max_new_tokens=3, do_sample=True, top_k=0, temperature=0.7)
    assert model.session.temperatures == [0.7, 0.7, 0.7] and out.shape == (1, 6)  # the draw was asked of the session
    greedy = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.session.temperatures[3:] == [None, None]  # and greedy again after it
    plain = GPT2LMHeadModel.from_pretrained(checkpoint).eval().generate(ids, max_new_tokens=2, do_sample=False)
    assert greedy.tolist() == plain.tolist()


def test_speculative_decoding_is_refused_unless_the_client_accepts_that_the_server_learns_acceptance(checkpoint):
    """Each check's length and crop tell the server how many drafted tokens it
    accepted: off by default, refused by name before any work."""
    draft = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    model = _standin_model(checkpoint)
    for options in ({"assistant_model": draft}, {"prompt_lookup_num_tokens": 2}):
        with pytest.raises(ValueError, match="generation.speculative_reveals_acceptance is true"):
            model.generate(ids, max_new_tokens=3, do_sample=False, **options)
    assert model.session.passes == []
    model = _standin_model(checkpoint, generation=GenerationSettings(speculative_reveals_acceptance=True))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=draft)
    assert out.tolist() == draft.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    assert max(model.session.passes[1:]) > 1  # the draft (here the model itself) was checked several tokens a pass


def test_generation_metadata_comes_from_the_checkpoint(checkpoint):
    model = _standin_model(checkpoint)
    assert (model.config.eos_token_id, model.config.bos_token_id) == (7, 7)
    assert model.generation_config.eos_token_id == 7 and model.generation_config.max_new_tokens == 3
    out = model.generate(torch.tensor([[1, 2, 3]]), do_sample=False)  # max_new_tokens=3 from generation_config.json
    plain = GPT2LMHeadModel.from_pretrained(checkpoint).eval().generate(torch.tensor([[1, 2, 3]]), do_sample=False)
    assert out.tolist() == plain.tolist() and plain.shape[1] <= 3 + 3


def test_the_cache_handle_cannot_be_copied_and_a_plain_call_does_not_discard_a_conversation(checkpoint):
    model = _standin_model(checkpoint)
    cache = EncryptedCache(model)
    model.generate(torch.tensor([[1, 2, 3]]), cache=cache, max_new_tokens=2, do_sample=False)
    with pytest.raises(TypeError, match="cannot be copied.*cache.crop"):
        copy.deepcopy(cache)
    with pytest.raises(RuntimeError, match="holds a conversation of 4 tokens"):
        model(torch.tensor([[5, 6]]))
    assert model.session.n_tokens == 4  # the conversation is intact
    cache.reset()
    assert model(torch.tensor([[5, 6]])).logits.shape == (1, 2, 64)
    del cache
    model.generate(torch.tensor([[1, 2]]), max_new_tokens=1, do_sample=False)  # a new conversation, its cache dropped
    assert model(torch.tensor([[5]])).logits.shape == (1, 1, 64)


def test_batches_name_the_fix(checkpoint):
    model = _standin_model(checkpoint)
    with pytest.raises(ValueError, match="batch size 2 is not supported.*batch_size=1"):
        model.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=1)


@pytest.mark.parametrize("change, named", [
    ({"n_embd": 8192, "n_head": 64}, "n_embd=8192 is too wide.*HE row of 4096 slots"),
    ({"activation_function": "relu"}, "relu"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_gpt2_variants_are_refused_by_name_from_the_config(change, named):
    with pytest.raises(UnsupportedArchitectureError, match=named):
        family_for_config(GPT2Config(**{"n_layer": 1, "n_embd": 64, "n_head": 2, **change}))


@pytest.mark.timeout(300)
def test_remote_model_uses_the_servers_metadata_and_save_pretrained_loads_through_automodel(checkpoint, tmp_path):
    proc, live = start_server(checkpoint)
    try:
        model = CryptoGenForCausalLM.from_pretrained(**live.client_kwargs())  # no local path at all
        try:
            assert model.config.eos_token_id == 7 and model.generation_config.max_new_tokens == 3
            ids = torch.tensor([[1, 2, 3]])
            secure = model.generate(ids, do_sample=False)
            model.save_pretrained(tmp_path / "secure")
        finally:
            model.close()
        plain = GPT2LMHeadModel.from_pretrained(checkpoint).eval().generate(ids, do_sample=False)
        assert secure.tolist() == plain.tolist()
        saved = json.loads((tmp_path / "secure" / "config.json").read_text())
        assert saved["model_type"] == "cryptogen" and saved["cryptogen"]["server"] == live.address
        assert live.tokens["alice"] not in (tmp_path / "secure" / "config.json").read_text()  # no token is written
        assert not list((tmp_path / "secure").glob("*.safetensors"))
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "secure", server_token=live.tokens["alice"])
        try:
            assert isinstance(again, CryptoGenForCausalLM)
            assert again.generate(ids, do_sample=False).tolist() == plain.tolist()
        finally:
            again.close()
    finally:
        stop_server(proc)
