"""The server's view of a checkpoint, rearranged for the secure protocol.

Everything here happens in plaintext at the server, on its own weights; the
client never runs this code and never sees its output. The per-family
rearrangement (``prepare`` in ``cryptogen_hf/families/<family>.py``) uses
the helpers below; all of it is exact algebra, no approximation:

- A norm's affine part is folded into the linear layer that follows it:
  (n * g + b) @ W + c = n @ (diag(g) W) + (b @ W + c), so the MPC norm only
  computes the normalised n. In the supported families each norm feeds
  exactly one (possibly fused) linear layer, so nothing else needs the affine
  output.
- The attention scale 1/sqrt(head_dim) is folded into the query columns, so
  scores come out of the HE product already scaled (a rotary embedding is
  linear, so it commutes with that scale).
- Weights are kept as (in, out): y = x @ W + b.

``reference_forward`` runs the rearranged model in float64 plaintext: the
test oracle that separates folding mistakes from protocol or quantisation
error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..families import ModelShape, family


@dataclass
class Linear:
    weight: torch.Tensor  # (in, out), float64
    bias: torch.Tensor  # (out,), float64

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass
class PreparedDecoder:
    """A decoder LM with norm affines and the attention scale folded into linears."""

    shape: ModelShape  # without the norm pre-scales (server.calibration adds them)
    wte: torch.Tensor  # (vocab, d): token embedding, used as a secret-index lookup
    wpe: torch.Tensor | None  # (positions, d): learned position embedding (public index); None with rotary positions
    blocks: list[dict[str, Linear]]  # per block, the family's linears (families.<f>.linear_shapes)
    lm_head: Linear  # the final norm's affine folded in; (d, vocab)


def linear_from(weight, bias=None) -> Linear:
    """A Linear from an (in, out) weight and an optional bias (zeros if None)."""
    w = weight.detach().double()
    b = torch.zeros(w.shape[1], dtype=torch.float64) if bias is None else bias.detach().double()
    return Linear(weight=w, bias=b)


def fold_norm(norm, linear: Linear) -> Linear:
    """diag(g) W and b @ W + c for a norm with weight g and optional bias b."""
    g = norm.weight.detach().double()
    bias = linear.bias
    if getattr(norm, "bias", None) is not None:
        bias = norm.bias.detach().double() @ linear.weight + bias
    return Linear(weight=g[:, None] * linear.weight, bias=bias)


def scale_columns(linear: Linear, columns: slice, factor: float) -> Linear:
    """Multiply some output columns (e.g. the queries') by a public factor."""
    linear.weight[:, columns] *= factor
    linear.bias[columns] *= factor
    return linear


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ---------------------------------------------------------------------------
# Plaintext reference of exactly the computation the protocol performs.
# ---------------------------------------------------------------------------
def normalize(x: torch.Tensor, eps: float, centered: bool = True) -> torch.Tensor:
    """LayerNorm (centered) or RMSNorm without the affine part."""
    if centered:
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)


def causal_attention(shape: ModelShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + causal mask) v for (t, heads * head_dim) queries and
    (t, kv_heads * head_dim) keys and values (each key/value head serves
    ``kv_groups`` consecutive query heads, as in HF's repeat_kv). The scale is
    already in q."""
    t, dh = q.shape[0], shape.head_dim
    q = q.view(t, shape.n_head, dh).transpose(0, 1)
    k = k.view(t, shape.n_kv_head, dh).transpose(0, 1).repeat_interleave(shape.kv_groups, dim=0)
    v = v.view(t, shape.n_kv_head, dh).transpose(0, 1).repeat_interleave(shape.kv_groups, dim=0)
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    probs = torch.softmax(q @ k.transpose(-1, -2) + causal, dim=-1)
    return (probs @ v).transpose(0, 1).reshape(t, shape.d_attn)


def reference_forward(prepared: PreparedDecoder, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) for a 1-D sequence of token ids, float64 plaintext."""
    shape = prepared.shape
    wiring = family(shape.family)
    ids = input_ids.reshape(-1)
    h = prepared.wte[ids]
    if prepared.wpe is not None:
        h = h + prepared.wpe[: ids.numel()]
    for block in prepared.blocks:
        h = wiring.reference_block(shape, block, h)
    return normalize(h, shape.norm_eps, wiring.NORM_CENTERED) @ prepared.lm_head.weight + prepared.lm_head.bias
