"""cryptogen_hf: private text generation for HuggingFace Transformers.

Layout (one home per concern):
  he/        BFV kernels on SEAL (tenseal.sealapi): keys, matrix products, cache layouts
  mpc/       CrypTen secret-sharing runtime and non-linear ops (softmax, GELU, SiLU, LayerNorm, RMSNorm)
  protocol/  the secure decoder's layers, conversions between HE ciphertexts and secret shares, transport
  families/  per-architecture wiring (GPT-2, LLaMA/Mistral/Qwen2): shape, weights, block
  hf/        HuggingFace integration (model, encrypted cache)
  server/    the model-hosting server
"""

from pathlib import Path

__version__ = "0.1.0"

# The small models that ship with the package (made by scripts/train_small_model.py):
# a GPT-2 (the demo's), a LLaMA-architecture model with the same tokenizer, and
# a 2-layer GPT-2 distilled from the first, the client's draft model for
# speculative decoding (generate(assistant_model=...)).
SHIPPED_MODEL_DIR = Path(__file__).parent / "models" / "tiny-gpt2"
SHIPPED_LLAMA_DIR = Path(__file__).parent / "models" / "tiny-llama"
SHIPPED_DRAFT_DIR = Path(__file__).parent / "models" / "tiny-gpt2-draft"


def __getattr__(name):
    # Lazy: `import cryptogen_hf` stays light; the HF classes pull in transformers and crypten.
    if name in ("CryptoGenForCausalLM", "EncryptedCache", "CryptoGenModelConfig"):
        from .hf import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'cryptogen_hf' has no attribute {name!r}")
