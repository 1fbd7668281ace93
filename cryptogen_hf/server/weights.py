"""The server's view of a GPT-2 checkpoint, rearranged for the secure protocol.

Everything here happens in plaintext at the server, on its own weights; the
client never runs this code and never sees its output.

What changes compared to the HF module (all exact algebra, no approximation):
- LayerNorm's affine part is folded into the linear layer that follows it:
  (n * g + b) @ W + c = n @ (diag(g) W) + (b @ W + c), so the MPC LayerNorm only
  computes the normalised n = (x - mean) / sqrt(var + eps). Each LayerNorm in
  GPT-2 feeds exactly one linear layer (ln_1 -> c_attn, ln_2 -> c_fc,
  ln_f -> lm_head), so nothing else needs the affine output.
- The attention scale 1/sqrt(head_dim) is folded into the query columns of
  c_attn, so scores come out of the HE product already scaled.
- GPT-2's Conv1D stores weights as (in, out): y = x @ W + b. We keep that.

``reference_forward`` runs the rearranged model in float64 plaintext: the
test oracle that separates folding mistakes from protocol or quantisation
error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("gpt2",)
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is not an architecture the secure protocol implements."""


@dataclass
class Linear:
    weight: torch.Tensor  # (in, out), float64
    bias: torch.Tensor  # (out,), float64

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass
class Block:
    qkv: Linear  # ln_1 affine and 1/sqrt(head_dim) folded in; columns [q | k | v]
    attn_out: Linear
    fc_in: Linear  # ln_2 affine folded in
    fc_out: Linear
    ln_1_eps: float
    ln_2_eps: float


@dataclass
class PreparedGPT2:
    """A GPT-2 LM with LayerNorm affines and the attention scale folded into linears."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int
    wte: torch.Tensor  # (vocab, d): token embedding, used as a secret-index lookup
    wpe: torch.Tensor  # (positions, d): position embedding, public index
    blocks: list[Block]
    lm_head: Linear  # ln_f affine folded in; (d, vocab)
    ln_f_eps: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def check_supported(config, row_size: int | None = None) -> None:
    """Raise UnsupportedArchitectureError naming what is not supported, from the
    config alone (before any weight is read). ``row_size``: the HE row (half
    the ring dimension; default: the default parameters')."""
    if row_size is None:
        from ..he.params import HEParams

        row_size = HEParams().row_size
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"cryptogen_hf supports {SUPPORTED_MODEL_TYPES} checkpoints; this one is model_type={model_type!r}"
        )
    act = getattr(config, "activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedArchitectureError(f"activation {act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError("cross-attention GPT-2 variants are not supported")
    if config.n_embd % config.n_head:
        raise UnsupportedArchitectureError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    inner = getattr(config, "n_inner", None) or 4 * config.n_embd
    if inner != 4 * config.n_embd:
        raise UnsupportedArchitectureError(f"an MLP width n_inner={inner} other than 4 x n_embd={4 * config.n_embd} is not supported")
    if inner > row_size:
        raise UnsupportedArchitectureError(
            f"n_embd={config.n_embd} is too wide: the MLP's {inner} inputs exceed the HE row of {row_size} slots "
            f"(GPT-2 small and medium fit; large and XL do not yet)"
        )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
        raise UnsupportedArchitectureError("attention scaled other than by 1/sqrt(head_dim) (scale_attn_by_inverse_layer_idx, "
                                           "scale_attn_weights=False) is not supported")


def _fold_layernorm(ln, linear_weight, linear_bias) -> Linear:
    g = ln.weight.detach().double()
    b = ln.bias.detach().double()
    w = linear_weight.detach().double()
    c = linear_bias.detach().double()
    return Linear(weight=g[:, None] * w, bias=b @ w + c)


def prepare_gpt2(model) -> PreparedGPT2:
    """Rearrange an HF ``GPT2LMHeadModel`` for the secure protocol (server side)."""
    config = model.config
    check_supported(config)
    transformer = model.transformer
    d = config.n_embd
    head_dim = d // config.n_head
    scale = 1.0 / math.sqrt(head_dim) if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise UnsupportedArchitectureError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")

    blocks = []
    for block in transformer.h:
        qkv = _fold_layernorm(block.ln_1, block.attn.c_attn.weight, block.attn.c_attn.bias)
        qkv.weight[:, :d] *= scale
        qkv.bias[:d] *= scale
        blocks.append(
            Block(
                qkv=qkv,
                attn_out=Linear(block.attn.c_proj.weight.detach().double(), block.attn.c_proj.bias.detach().double()),
                fc_in=_fold_layernorm(block.ln_2, block.mlp.c_fc.weight, block.mlp.c_fc.bias),
                fc_out=Linear(block.mlp.c_proj.weight.detach().double(), block.mlp.c_proj.bias.detach().double()),
                ln_1_eps=block.ln_1.eps,
                ln_2_eps=block.ln_2.eps,
            )
        )
    lm_weight = model.lm_head.weight.detach().double().t()  # (d, vocab)
    lm_bias = torch.zeros(lm_weight.shape[1], dtype=torch.float64)
    lm_head = _fold_layernorm(transformer.ln_f, lm_weight, lm_bias)
    return PreparedGPT2(
        n_layer=config.n_layer,
        n_embd=d,
        n_head=config.n_head,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        wte=transformer.wte.weight.detach().double().clone(),
        wpe=transformer.wpe.weight.detach().double().clone(),
        blocks=blocks,
        lm_head=lm_head,
        ln_f_eps=transformer.ln_f.eps,
    )


# ---------------------------------------------------------------------------
# Plaintext reference of exactly the computation the protocol performs.
# ---------------------------------------------------------------------------
def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_forward(prepared: PreparedGPT2, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) for a 1-D sequence of token ids, float64 plaintext."""
    t = input_ids.shape[-1]
    h = prepared.wte[input_ids.reshape(-1)] + prepared.wpe[:t]
    n_head, hd = prepared.n_head, prepared.head_dim
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for block in prepared.blocks:
        qkv = normalize(h, block.ln_1_eps) @ block.qkv.weight + block.qkv.bias
        q, k, v = qkv.split(prepared.n_embd, dim=-1)
        q = q.view(t, n_head, hd).transpose(0, 1)
        k = k.view(t, n_head, hd).transpose(0, 1)
        v = v.view(t, n_head, hd).transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(-1, -2) + causal, dim=-1)
        attn = (probs @ v).transpose(0, 1).reshape(t, prepared.n_embd)
        h = h + attn @ block.attn_out.weight + block.attn_out.bias
        m = gelu_tanh(normalize(h, block.ln_2_eps) @ block.fc_in.weight + block.fc_in.bias)
        h = h + m @ block.fc_out.weight + block.fc_out.bias
    return normalize(h, prepared.ln_f_eps) @ prepared.lm_head.weight + prepared.lm_head.bias
