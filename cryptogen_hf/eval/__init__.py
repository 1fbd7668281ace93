"""Evaluation helpers shared by the plaintext and secure models."""

from .perplexity import NLLResult, hf_model_fn, sliding_window_nll, window_spans

__all__ = ["NLLResult", "hf_model_fn", "sliding_window_nll", "window_spans"]
