"""Sliding-window (strided) perplexity for causal language models.

This is the evaluation recipe from the HuggingFace perplexity guide, written so
the model is just a function from token ids to logits. The plaintext model and
the secure (HE/MPC) model can then be scored by exactly the same code:

    model_fn(input_ids: LongTensor[1, T]) -> logits: Tensor[1, T, V]

How the windows work. The text has N tokens; token 0 is never predicted, so
there are N - 1 targets (positions 1..N-1). Windows start at 0, stride,
2*stride, ... and are at most `window` tokens long; the last one ends at N. A
window [begin, end) predicts positions begin+1 .. end-1, but only the targets
no earlier window has scored (position >= the previous window's end) are
counted. So each target is counted exactly once, and every target after the
first window sees at least window - stride tokens of context. stride must be
< window: with stride == window the first token of each window would have no
context inside its window and could not be scored (HF's loop silently drops
it; here every one of the N - 1 targets is scored). stride = window - 1 is the
fast, nearly disjoint setting; stride == 1 is exact but slowest.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class NLLResult:
    nll_sum: float  # summed negative log-likelihood, nats
    n_tokens: int  # number of scored (predicted) tokens
    n_windows: int  # number of model_fn calls

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


def window_spans(n_tokens: int, window: int, stride: int):
    """Yield (begin, end, first_target) for each window.

    The window covers token ids[begin:end]; targets at positions
    first_target .. end-1 are the ones it scores. Exposed separately so the
    span arithmetic can be tested without a model.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (got {window})")
    if not 1 <= stride < window:
        # stride == window would leave each window's first token with no context.
        raise ValueError(f"stride must be in [1, window - 1] (got stride={stride}, window={window})")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score anything (got {n_tokens})")
    prev_end = 1  # position 0 has no context, so the first target is position 1
    begin = 0
    while True:
        end = min(begin + window, n_tokens)
        yield begin, end, prev_end
        prev_end = end
        if end == n_tokens:
            break
        begin += stride


def sliding_window_nll(
    model_fn: ModelFn,
    token_ids: Union[Sequence[int], torch.Tensor],
    window: int,
    stride: int,
    progress: Optional[Callable[[int], None]] = None,
) -> NLLResult:
    """Summed token NLL of `token_ids` under `model_fn`, with strided windows.

    model_fn gets a LongTensor of shape [1, T] (T <= window) and must return
    logits of shape [1, T, V] (or [T, V]); logits at position t predict token
    t + 1. Log-softmax is taken here in float64 so approximate logits from the
    secure model are scored with no extra rounding. `progress`, if given, is
    called with the number of newly scored tokens after each window (e.g.
    a tqdm bar's update).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    n = ids.numel()
    nll_sum = 0.0
    n_scored = 0
    n_windows = 0
    for begin, end, first_target in window_spans(n, window, stride):
        chunk = ids[begin:end].unsqueeze(0)
        with torch.no_grad():
            logits = model_fn(chunk)
        logits = torch.as_tensor(logits)
        if logits.dim() == 3:
            logits = logits[0]
        if logits.shape[0] != end - begin:
            raise ValueError(f"model_fn returned {logits.shape[0]} positions for {end - begin} tokens")
        # Row i of `logits` predicts ids[begin + i + 1]. Keep the rows whose
        # target position is >= first_target: rows first_target-begin-1 .. end-begin-2.
        lo = first_target - begin - 1
        pred = logits[lo: end - begin - 1].double()
        targets = ids[first_target:end]
        nll = F.cross_entropy(pred, targets, reduction="sum")
        nll_sum += nll.item()
        n_scored += targets.numel()
        n_windows += 1
        if progress is not None:
            progress(targets.numel())
    assert n_scored == n - 1, (n_scored, n)  # every target exactly once
    return NLLResult(nll_sum=nll_sum, n_tokens=n_scored, n_windows=n_windows)


def hf_model_fn(model) -> ModelFn:
    """Wrap a HF causal LM (e.g. GPT2LMHeadModel) as a model_fn.

    use_cache=False because each window is scored from scratch.
    """
    model.eval()

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids.to(model.device), use_cache=False).logits.float().cpu()

    return fn
