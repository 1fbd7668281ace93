"""LLaMA and its close relatives (Mistral, Qwen2): RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP, no position embedding.

A block, as in transformers' modeling_llama (pre-norm):

    q, k, v = q_proj(x), k_proj(x), v_proj(x)        with x = input_layernorm(h)
    q, k = rope(q, pos), rope(k, pos)                 (a public rotation per position)
    h = h + o_proj(attention(q, repeat_kv(k), repeat_kv(v)))
    h = h + down_proj(silu(gate_proj(y)) * up_proj(y))   with y = post_attention_layernorm(h)

Secure names of the linears: qkv ([q | k | v] fused, (n_head + 2 n_kv_head)
head_dim outputs), attn_out (o_proj), gate_up ([gate | up] fused), down.
The norms' weights are folded into the linears after them; the attention
scale 1/sqrt(head_dim) into q (rope is linear, so the two commute); a
missing bias is zero (Qwen2 has q, k, v biases, Llama none).

Rotary embedding on shares: a fixed linear map of each head's pair of halves
by public cos and sin of the position, so each party applies it to its own
share (two public multiplications, each a local truncation: no round, no
message). The rotated keys go into the encrypted cache, as in HF's cache.

Grouped-query attention: the encrypted cache holds the n_kv_head shared
key/value heads (``SecureDecoder.attention``), as HF's cache does.
"""

from __future__ import annotations

import torch

from ..crypten_compat import import_crypten
from ..mpc import ops
from . import ModelShape, UnsupportedArchitectureError, check_cache_width

MODEL_TYPES = ("llama", "mistral", "qwen2")
NORM_CENTERED = False
# Rotary variants whose frequencies do not depend on the sequence length (the
# frequencies go into the public shape once).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _context(config) -> int:
    """Positions a sequence may use: within a sliding window (Mistral; Qwen2
    when use_sliding_window) attention is full, so the window bounds the context."""
    n = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        n = min(n, window)
    return n


def check_supported(config, row_size: int) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"MLP activation {act!r} is not supported (LLaMA-family models: 'silu')")
    rope_type = _rope_type(config)
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedArchitectureError(f"rope type {rope_type!r} is not supported (supported: {STATIC_ROPE_TYPES}; "
                                           "its frequencies change with the sequence length)")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % kv:
        raise UnsupportedArchitectureError(f"{config.num_attention_heads} attention heads do not split into {kv} key/value groups")
    if _head_dim(config) % 2:
        raise UnsupportedArchitectureError(f"head_dim={_head_dim(config)} is odd: rotary embedding needs pairs")
    check_cache_width("num_key_value_heads x head_dim", kv * _head_dim(config), row_size)


def shape_from_config(config, rotary=None) -> ModelShape:
    """``rotary``: the model's rotary-embedding module (its inv_freq and
    attention_scaling, as HF computes them for the config); built from the
    config when not given."""
    if rotary is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rotary = LlamaRotaryEmbedding(config)
    return ModelShape(
        family="llama",
        n_layer=config.num_hidden_layers,
        n_embd=config.hidden_size,
        n_head=config.num_attention_heads,
        n_kv_head=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=_head_dim(config),
        d_mlp=config.intermediate_size,
        n_positions=_context(config),
        vocab_size=config.vocab_size,
        norm_eps=float(config.rms_norm_eps),
        rope_inv_freq=[float(f) for f in rotary.inv_freq.double()],
        rope_attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    d = shape.n_embd
    return {"qkv": (d, shape.d_attn + 2 * shape.d_kv), "attn_out": (shape.d_attn, d), "gate_up": (d, 2 * shape.d_mlp), "down": (shape.d_mlp, d)}


def norm_modules(model) -> list:
    modules = []
    for layer in model.model.layers:
        modules += [layer.input_layernorm, layer.post_attention_layernorm]
    return modules + [model.model.norm]


def prepare(model):
    """Rearrange an HF Llama/Mistral/Qwen2 ``...ForCausalLM`` for the secure protocol (server side)."""
    from ..server.weights import Linear, PreparedDecoder, attention_scale, fold_norm, linear_from, scale_columns

    def fused(*modules) -> Linear:  # nn.Linear stores (out, in)
        parts = [linear_from(m.weight.t(), m.bias) for m in modules]
        return Linear(torch.cat([p.weight for p in parts], dim=1), torch.cat([p.bias for p in parts]))

    shape = shape_from_config(model.config, model.model.rotary_emb)
    blocks = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = fold_norm(layer.input_layernorm, fused(attn.q_proj, attn.k_proj, attn.v_proj))
        blocks.append({
            "qkv": scale_columns(qkv, slice(0, shape.d_attn), attention_scale(shape.head_dim)),
            "attn_out": linear_from(attn.o_proj.weight.t(), attn.o_proj.bias),
            "gate_up": fold_norm(layer.post_attention_layernorm, fused(mlp.gate_proj, mlp.up_proj)),
            "down": linear_from(mlp.down_proj.weight.t(), mlp.down_proj.bias),
        })
    return PreparedDecoder(
        shape=shape,
        wte=model.model.embed_tokens.weight.detach().double().clone(),
        wpe=None,
        blocks=blocks,
        lm_head=fold_norm(model.model.norm, linear_from(model.lm_head.weight.t(), getattr(model.lm_head, "bias", None))),
    )


def rotary_cos_sin(shape: ModelShape, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Public cos and sin (len(positions), head_dim) as HF's rotary embedding
    makes them: in float32 whatever the model's dtype, so these are HF's numbers."""
    freqs = positions.float()[:, None] * torch.tensor(shape.rope_inv_freq, dtype=torch.float32)[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    scaling = shape.rope_attention_scaling
    return (angles.cos() * scaling).double(), (angles.sin() * scaling).double()


def rotate(x, cos, sin, cat):
    """x cos + rotate_half(x) sin over the last dim (heads in the one before);
    ``cat``: torch.cat or crypten.cat (the same code on plaintext and shares)."""
    half = x.size(-1) // 2
    rotated_half = cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated_half * sin[:, None, :]


def _split_heads(shape: ModelShape, qkv):
    T, dh, kv = qkv.size(0), shape.head_dim, shape.d_kv
    q = qkv[:, : shape.d_attn].reshape(T, shape.n_head, dh)
    k = qkv[:, shape.d_attn : shape.d_attn + kv].reshape(T, shape.n_kv_head, dh)
    v = qkv[:, shape.d_attn + kv :].reshape(T, shape.n_kv_head, dh)
    return q, k, v


def secure_block(model, layer: int, h, t0: int, T: int, store_outer=None):
    """One block over T new tokens at positions t0..t0+T-1 (``model``: a SecureDecoder)."""
    crypten = import_crypten()
    shape = model.shape
    x = model.norm(h, 2 * layer)
    q, k, v = _split_heads(shape, model.linear(x, "qkv", layer))
    with model.timed("rope"):
        cos, sin = rotary_cos_sin(shape, torch.arange(t0, t0 + T))
        q, k = rotate(q, cos, sin, crypten.cat), rotate(k, cos, sin, crypten.cat)
        qkv = crypten.cat([t.reshape(T, -1) for t in (q, k, v)], dim=-1)
    h = h + model.linear(model.attention(layer, qkv, t0, T, store_outer), "attn_out", layer)
    x = model.norm(h, 2 * layer + 1)
    gate_up = model.linear(x, "gate_up", layer)
    with model.timed("swiglu"):
        m = ops.swiglu(gate_up)
    return h + model.linear(m, "down", layer)


def reference_block(shape: ModelShape, block: dict, h: torch.Tensor) -> torch.Tensor:
    from ..server.weights import causal_attention, normalize

    T = h.size(0)
    x = normalize(h, shape.norm_eps, centered=False)
    q, k, v = _split_heads(shape, x @ block["qkv"].weight + block["qkv"].bias)
    cos, sin = rotary_cos_sin(shape, torch.arange(T))
    q, k = rotate(q, cos, sin, torch.cat), rotate(k, cos, sin, torch.cat)
    attn = causal_attention(shape, q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1))
    h = h + attn @ block["attn_out"].weight + block["attn_out"].bias
    gate_up = normalize(h, shape.norm_eps, centered=False) @ block["gate_up"].weight + block["gate_up"].bias
    m = ops.silu_reference(gate_up[:, : shape.d_mlp]) * gate_up[:, shape.d_mlp :]
    return h + m @ block["down"].weight + block["down"].bias
