"""Decoder families: the one place that knows how each architecture is built.

The secure layers (``protocol/decoder.py``: HE linears, attention over the
encrypted cache, MPC norms and activations) are the same for every decoder;
what differs is the wiring of a block and how a Hugging Face checkpoint maps
onto those layers. Each family is one module here with:

    MODEL_TYPES            the HF ``model_type`` values it loads unchanged
    NORM_CENTERED          LayerNorm (True) or RMSNorm (False)
    check_supported(config, row_size)   refusals by name, from config.json alone
    shape_from_config(config)           the public ``ModelShape``
    linear_shapes(shape)   the block's linear layers {name: (d_in, d_out)}
    norm_modules(model)    its norm modules in forward order (calibration)
    prepare(model)         server only: weights rearranged (``server.weights``)
    secure_block(...)      the block on shares and ciphertexts (both parties)
    reference_block(...)   the same in float64 plaintext (the test oracle)

Adding a family is one such module, an entry in ``_FAMILIES`` and its tests.

``ModelShape`` is what both parties know about the model. The server builds
it from the checkpoint's config.json (plus public calibration numbers), the
handshake carries it to the client, and the client's HF config is built from
it (``hf/modeling.py``): one description, three users.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is not an architecture the secure protocol implements."""


@dataclass
class ModelShape:
    """Public description of a decoder: sizes, norm epsilon and pre-scales, rotary frequencies.

    The norm pre-scales are public numbers the server computes from plaintext
    activations (see ``server.calibration``); they reveal the rough scale of
    each norm's input, nothing more (stated in docs/THREAT_MODEL.md). The
    rotary frequencies are those of the checkpoint's config.json.
    """

    family: str  # a key of _FAMILIES: which wiring
    n_layer: int
    n_embd: int  # width of the residual stream
    n_head: int  # query heads
    n_kv_head: int  # key/value heads (grouped-query attention when fewer than n_head)
    head_dim: int
    d_mlp: int  # the MLP's hidden width
    n_positions: int
    vocab_size: int
    norm_eps: float
    norm_pre_scales: list = field(default_factory=list)  # 2 per block + the final one
    rope_inv_freq: list = field(default_factory=list)  # head_dim / 2 frequencies; empty: learned positions
    rope_attention_scaling: float = 1.0  # factor on cos and sin (some rope types scale them)
    name: str = ""

    @property
    def d_attn(self) -> int:
        """Width of the attention's queries (and of its output)."""
        return self.n_head * self.head_dim

    @property
    def d_kv(self) -> int:
        """Width of the keys (and of the values)."""
        return self.n_kv_head * self.head_dim

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_kv_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        shape = cls(**d)
        family(shape.family)  # a clear error for a family this version does not know
        if shape.n_head % shape.n_kv_head:
            raise ValueError(f"{shape.n_head} query heads do not split into {shape.n_kv_head} key/value groups")
        return shape


# family name -> module (imported when first needed: a family module uses the
# protocol's and the server's helpers, which themselves import ModelShape).
_FAMILIES = {"gpt2": "cryptogen_hf.families.gpt2", "llama": "cryptogen_hf.families.llama"}


def family(name: str):
    """The module of family ``name``."""
    if name not in _FAMILIES:
        raise UnsupportedArchitectureError(f"unknown model family {name!r} (known: {sorted(_FAMILIES)})")
    return importlib.import_module(_FAMILIES[name])


def supported_model_types() -> dict[str, str]:
    """HF model_type -> family name."""
    return {model_type: name for name in _FAMILIES for model_type in family(name).MODEL_TYPES}


def family_for_config(config, row_size: int | None = None):
    """The family module of an HF config, after its checks: raises
    UnsupportedArchitectureError naming what is not supported, from the
    config alone (before any weight is read). ``row_size``: the HE row (half
    the ring dimension; default: the default parameters')."""
    if row_size is None:
        from ..he.params import HEParams

        row_size = HEParams().row_size
    model_type = getattr(config, "model_type", None)
    known = supported_model_types()
    if model_type not in known:
        raise UnsupportedArchitectureError(
            f"cryptogen_hf supports {tuple(known)} checkpoints; this one is model_type={model_type!r}"
        )
    module = family(known[model_type])
    module.check_supported(config, row_size)
    return module


def check_cache_width(what: str, width: int, row_size: int):
    """A token's keys (all key/value heads) must fit one HE row: the encrypted
    cache's layout (he/attention.py). Linear layers of any width are fine
    (an input wider than a row is split: he/matvec.py)."""
    if width > row_size:
        raise UnsupportedArchitectureError(
            f"{what}={width} is too wide: a token's keys must fit the HE row of {row_size} slots"
        )
