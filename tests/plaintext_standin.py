"""A PLAINTEXT stand-in for ``ClientSession``, for testing the HF plumbing only.

It runs the ordinary GPT-2 in this process: nothing is encrypted or shared,
and it is not a session with anyone. It lets tests of ``generate()`` options
(what is refused, what metadata is used, how the cache handle behaves) run in
milliseconds; every feature class also has a real secure run through real
processes (tests/test_secure_generate.py, tests/test_sessions.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from cryptogen_hf.config import CryptoGenConfig
from cryptogen_hf.families import gpt2
from cryptogen_hf.server.serve import generation_metadata


class PlaintextStandInSession:
    """The interface CryptoGenForCausalLM uses, computed in the clear."""

    def __init__(self, checkpoint, config: CryptoGenConfig | None = None):
        self.model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
        self.config = config or CryptoGenConfig()
        c = self.model.config
        self.shape = gpt2.shape_from_config(c)
        self.generation = generation_metadata(Path(checkpoint))
        self.tokens: list[int] = []
        self.passes: list[int] = []  # tokens per forward pass, as the server would run them
        self.temperatures: list = []  # reveal: token: the sampling temperature asked at each pass (None: argmax)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def forward(self, token_ids, logits_for, temperature=None):
        if self.n_tokens + len(token_ids) > self.shape.n_positions:
            raise ValueError("exceeds the model's context")
        self.passes.append(len(token_ids))
        self.tokens += [int(t) for t in token_ids]
        with torch.no_grad():  # recomputes the whole sequence: a tiny model, and no cache to get wrong
            logits = self.model(torch.tensor([self.tokens])).logits[0, -len(token_ids):].double()
        logits = logits[torch.tensor(logits_for)]
        if self.config.mpc.reveal == "token":
            self.temperatures.append(temperature)
            chosen = logits.argmax(-1) if temperature is None else torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
            rows = torch.full_like(logits, float("-inf"))
            rows[torch.arange(len(rows)), chosen] = 0.0
            return rows
        return logits

    def reset(self):
        self.tokens = []

    def crop(self, n_tokens: int):
        self.tokens = self.tokens[:n_tokens]

    def stats(self) -> dict:
        return {"tokens": self.n_tokens, "cache_bytes": 0, "passes": len(self.passes)}

    def prepare_correlations(self, tokens: int) -> bool:
        return False

    def close(self):
        pass
