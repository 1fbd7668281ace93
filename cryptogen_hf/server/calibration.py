"""Norm pre-scales: public per-norm numbers the server computes in plaintext.

The MPC LayerNorm (and RMSNorm) is accurate when its input rows have a
standard deviation (root mean square) in a known window
(``mpc.ops.layer_norm``); the residual stream drifts far outside it in later
layers. The norm is scale-invariant (up to eps), so the server multiplies
each norm's input by a public constant that centres that layer's observed
row scales in the window. The server measures
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


def norm_inputs(model, wiring, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of every norm in forward order (``wiring.norm_modules``: 2 per block, then the final one)."""
    modules = wiring.norm_modules(model)
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


def norm_pre_scales(model, wiring, shape, tokenizer=None) -> list[float]:
    """One public pre-scale per norm (2 per block + final), from the calibration text."""
    context, eps = shape.n_positions, shape.norm_eps
    ids = None
    if tokenizer is not None:
        ids = tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :context]
        if ids.numel() == 0 or int(ids.max()) >= model.config.vocab_size:
            ids = None  # not this model's tokenizer
    if ids is None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, min(64, context)), generator=generator)
    return [calibrate_pre_scale(x[0], eps=eps, centered=wiring.NORM_CENTERED) for x in norm_inputs(model, wiring, ids)]
