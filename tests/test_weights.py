"""The server's weight rearrangement (LayerNorm and attention-scale folding) is exact."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from cryptogen_hf.server.weights import UnsupportedArchitectureError, check_supported, prepare_gpt2, reference_forward


def _random_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=48, n_head=4, n_positions=32, vocab_size=97, activation_function="gelu_new")
    model = GPT2LMHeadModel(config).eval()
    # Non-trivial LayerNorm affines, so a missing or transposed fold shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model.double()


def test_folded_reference_matches_hf_logits():
    model = _random_gpt2()
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        expected = model(ids).logits[0]
    got = reference_forward(prepare_gpt2(model), ids[0])
    assert torch.allclose(got, expected, atol=1e-9), (got - expected).abs().max()


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        check_supported(LlamaConfig())
    with pytest.raises(UnsupportedArchitectureError, match="relu"):
        check_supported(GPT2Config(activation_function="relu"))
