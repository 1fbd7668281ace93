"""LayerNorm pre-scales: public per-LayerNorm numbers the server computes in plaintext.

The MPC LayerNorm is accurate when its input rows have a standard deviation
in a known window (``mpc.ops.layer_norm``); GPT-2's residual stream drifts
far outside it in later layers. LayerNorm is scale-invariant (up to eps), so
the server multiplies each LayerNorm's input by a public constant that
centres that layer's observed row scales in the window. The server measures
the scales on its own model with a fixed calibration text: the client's data
is never involved.
"""

from __future__ import annotations

import torch

from ..mpc.ops import calibrate_pre_scale

# A neutral English paragraph; what matters is that it exercises typical activations.
CALIBRATION_TEXT = (
    "The city was founded in the early nineteenth century on the banks of the river. "
    "It grew quickly as a trading town, and by 1900 its population had reached forty thousand. "
    "First Citizen: Before we proceed any further, hear me speak. "
    "The results of the study were published in a scientific journal in 2012, and the "
    "authors noted that further work would be needed to confirm them."
)


def layer_norm_inputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of every LayerNorm in forward order: ln_1, ln_2 of each block, then ln_f."""
    modules = []
    for block in model.transformer.h:
        modules += [block.ln_1, block.ln_2]
    modules.append(model.transformer.ln_f)
    captured = [None] * len(modules)
    hooks = [
        m.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach().double()))
        for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def layer_norm_pre_scales(model, tokenizer=None, eps: float = 1e-5) -> list[float]:
    """One public pre-scale per LayerNorm (2 per block + final), from the calibration text."""
    ids = None
    if tokenizer is not None:
        ids = tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, : model.config.n_positions]
        if ids.numel() == 0 or int(ids.max()) >= model.config.vocab_size:
            ids = None  # not this model's tokenizer
    if ids is None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, min(64, model.config.n_positions)), generator=generator)
    return [calibrate_pre_scale(x[0], eps=eps) for x in layer_norm_inputs(model, ids)]
