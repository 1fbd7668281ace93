"""The server's weight rearrangement (norm, attention-scale and rotary folding) is exact, per family."""

import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, Qwen2Config,
    Qwen2ForCausalLM,
)

from cryptogen_hf.families import UnsupportedArchitectureError, family_for_config, llama
from cryptogen_hf.server.weights import reference_forward


def _perturb_norms(model, names=("ln_", "norm")):
    """Non-trivial norm affines, so a missing or transposed fold shows up."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn_like(p) * 0.5)
    return model.double()


def _random_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=48, n_head=4, n_positions=32, vocab_size=97, activation_function="gelu_new")
    return _perturb_norms(GPT2LMHeadModel(config).eval())


def _random_llama(seed=0, tie=False):
    """Grouped-query attention (4 query heads on 2 key/value heads), untied head by default."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, vocab_size=97, tie_word_embeddings=tie)
    return _perturb_norms(LlamaForCausalLM(config).eval())


def _random_qwen2(seed=0):
    """Qwen2: q, k, v biases."""
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, vocab_size=97)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return _perturb_norms(model)


def _random_mistral(seed=0):
    """Mistral: a sliding window, which bounds the secure context (within it attention is full)."""
    torch.manual_seed(seed)
    config = MistralConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           max_position_embeddings=64, sliding_window=16, vocab_size=97)
    model = _perturb_norms(MistralForCausalLM(config).eval())
    assert family_for_config(model.config).shape_from_config(model.config).n_positions == 16
    return model


# HF's LLaMA-family RMSNorm and rotary tables compute in float32 even in a
# float64 model (~1e-7 here); a folding mistake is off by far more.
@pytest.mark.parametrize("make, atol", [(_random_gpt2, 1e-9), (_random_llama, 1e-6), (lambda: _random_llama(tie=True), 1e-6),
                                        (_random_qwen2, 1e-6), (_random_mistral, 1e-6)],
                         ids=["gpt2", "llama-gqa-untied", "llama-tied", "qwen2-biases", "mistral-window-mqa"])
def test_folded_reference_matches_hf_logits(make, atol):
    model = make()
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        expected = model(ids).logits[0]
    got = reference_forward(family_for_config(model.config).prepare(model), ids[0])
    assert torch.allclose(got, expected, atol=atol), (got - expected).abs().max()


def test_llama_rope_scaling_frequencies_follow_hf():
    """A llama3-scaled rotary embedding (Llama 3.x) reaches the shape as HF computes it."""
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, vocab_size=97,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8})
    model = _perturb_norms(LlamaForCausalLM(config).eval())
    prepared = family_for_config(model.config).prepare(model)
    default = llama.shape_from_config(LlamaConfig(hidden_size=48, num_attention_heads=4, intermediate_size=80))
    assert prepared.shape.rope_inv_freq != default.rope_inv_freq  # the scaling changed some frequencies
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits[0]
    assert torch.allclose(reference_forward(prepared, ids[0]), expected, atol=1e-6)


@pytest.mark.parametrize("config, named", [
    (OPTConfig(), "model_type='opt'"),
    (GPT2Config(activation_function="relu"), "relu"),
    (LlamaConfig(hidden_act="gelu"), "'gelu'"),
    (LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (LlamaConfig(num_attention_heads=64, num_key_value_heads=64, hidden_size=8192), "num_key_value_heads x head_dim=8192 is too wide"),
])
def test_unsupported_architecture_is_named(config, named):
    with pytest.raises(UnsupportedArchitectureError, match=named):
        family_for_config(config)
