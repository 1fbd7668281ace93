"""GPT-2: LayerNorm, learned positions, fused q|k|v with biases, GELU MLP, tied head.

A block, as in transformers' modeling_gpt2 (pre-norm):

    h = h + c_proj(attention(c_attn(ln_1(h))))
    h = h + mlp.c_proj(gelu(mlp.c_fc(ln_2(h))))

Secure names of the linears: qkv (c_attn), attn_out (attn.c_proj), fc_in
(mlp.c_fc), fc_out (mlp.c_proj). GPT-2's Conv1D stores weights as (in, out),
the layout the protocol uses.
"""

from __future__ import annotations

import torch

from ..mpc import ops
from . import ModelShape, UnsupportedArchitectureError, check_cache_width

MODEL_TYPES = ("gpt2",)
NORM_CENTERED = True
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def check_supported(config, row_size: int) -> None:
    act = getattr(config, "activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedArchitectureError(f"activation {act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError("cross-attention GPT-2 variants are not supported")
    if config.n_embd % config.n_head:
        raise UnsupportedArchitectureError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    check_cache_width("n_embd", config.n_embd, row_size)
    if (getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True)
            or getattr(config, "reorder_and_upcast_attn", False)):
        raise UnsupportedArchitectureError("attention scaled other than by 1/sqrt(head_dim) (scale_attn_by_inverse_layer_idx, "
                                           "scale_attn_weights=False, reorder_and_upcast_attn) is not supported")


def shape_from_config(config) -> ModelShape:
    return ModelShape(
        family="gpt2",
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_kv_head=config.n_head,
        head_dim=config.n_embd // config.n_head,
        d_mlp=getattr(config, "n_inner", None) or 4 * config.n_embd,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        norm_eps=float(config.layer_norm_epsilon),
    )


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    d = shape.n_embd
    return {"qkv": (d, 3 * d), "attn_out": (d, d), "fc_in": (d, shape.d_mlp), "fc_out": (shape.d_mlp, d)}


def norm_modules(model) -> list:
    modules = []
    for block in model.transformer.h:
        modules += [block.ln_1, block.ln_2]
    return modules + [model.transformer.ln_f]


def prepare(model):
    """Rearrange an HF ``GPT2LMHeadModel`` for the secure protocol (server side)."""
    from ..server.weights import PreparedDecoder, attention_scale, fold_norm, linear_from, scale_columns

    shape = shape_from_config(model.config)
    transformer = model.transformer
    blocks = []
    for block in transformer.h:
        qkv = fold_norm(block.ln_1, linear_from(block.attn.c_attn.weight, block.attn.c_attn.bias))
        blocks.append({
            "qkv": scale_columns(qkv, slice(0, shape.n_embd), attention_scale(shape.head_dim)),
            "attn_out": linear_from(block.attn.c_proj.weight, block.attn.c_proj.bias),
            "fc_in": fold_norm(block.ln_2, linear_from(block.mlp.c_fc.weight, block.mlp.c_fc.bias)),
            "fc_out": linear_from(block.mlp.c_proj.weight, block.mlp.c_proj.bias),
        })
    return PreparedDecoder(
        shape=shape,
        wte=transformer.wte.weight.detach().double().clone(),
        wpe=transformer.wpe.weight.detach().double().clone(),
        blocks=blocks,
        lm_head=fold_norm(transformer.ln_f, linear_from(model.lm_head.weight.t())),
    )


def secure_block(model, layer: int, h, t0: int, T: int, store_outer=None):
    """One block over T new tokens at positions t0..t0+T-1 (``model``: a SecureDecoder)."""
    x = model.norm(h, 2 * layer)
    qkv = model.linear(x, "qkv", layer)
    h = h + model.linear(model.attention(layer, qkv, t0, T, store_outer), "attn_out", layer)
    x = model.norm(h, 2 * layer + 1)
    m = model.linear(x, "fc_in", layer)
    with model.timed("gelu"):
        m = ops.gelu(m)
    return h + model.linear(m, "fc_out", layer)


def reference_block(shape: ModelShape, block: dict, h: torch.Tensor) -> torch.Tensor:
    from ..server.weights import causal_attention, normalize

    qkv = normalize(h, shape.norm_eps) @ block["qkv"].weight + block["qkv"].bias
    attn = causal_attention(shape, *qkv.split(shape.n_embd, dim=-1))
    h = h + attn @ block["attn_out"].weight + block["attn_out"].bias
    m = ops.gelu_reference(normalize(h, shape.norm_eps) @ block["fc_in"].weight + block["fc_in"].bias)
    return h + m @ block["fc_out"].weight + block["fc_out"].bias
