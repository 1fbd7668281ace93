"""Fine-tune the shipped model, then load the result securely with no conversion step.

The fine-tuning runs through `cryptogen finetune` (transformers Trainer) in
a child process; the secure model starts a real `cryptogen serve` process
for the output folder, which calibrates the LayerNorm pre-scales on load.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cryptogen_hf import SHIPPED_MODEL_DIR
from cryptogen_hf.hf.modeling import CryptoGenForCausalLM

REPO = Path(__file__).resolve().parent.parent
# A short, repetitive text: a few steps are enough to move the model towards it.
TEXT = ("The lighthouse keeper climbed the stairs at dusk and lit the lamp for the boats. " * 40
        + "The harbour was quiet and the keeper wrote the weather in his book. " * 40)
PROMPT = "The lighthouse keeper climbed"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    train_file = tmp / "train.txt"
    train_file.write_text(TEXT)
    out = tmp / "model"
    args = ["finetune", "--model", SHIPPED_MODEL_DIR, "--train-file", train_file, "--output-dir", out,
            "--max-steps", 8, "--block-size", 32, "--batch-size", 4, "--lr", "1e-3", "--seed", 0, "--quiet"]
    result = subprocess.run(
        [sys.executable, "-m", "cryptogen_hf.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss on train" in result.stdout
    return out


def test_finetune_lowers_the_loss_and_writes_an_ordinary_checkpoint(finetuned):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (finetuned / name).is_file(), name
    summary = json.loads((finetuned / "finetune_summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["loss_after"] < summary["loss_before"] - 0.5, summary
    before = load_file(SHIPPED_MODEL_DIR / "model.safetensors")
    after = load_file(finetuned / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed
    assert json.loads((finetuned / "config.json").read_text())["use_cache"] is True


def test_finetuned_checkpoint_loads_securely_and_generates_like_plaintext(finetuned):
    tokenizer = AutoTokenizer.from_pretrained(finetuned)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    plain_model = AutoModelForCausalLM.from_pretrained(finetuned).eval()
    with torch.no_grad():
        plain = plain_model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids),
                                     output_logits=True, return_dict_in_generate=True)
    # The fine-tuned model has learned the text: its greedy continuation is decisive (no near-ties).
    margins = [float(l[0].topk(2).values.diff().abs()) for l in plain.logits]
    assert min(margins) > 0.2, margins

    secure_model = CryptoGenForCausalLM.from_pretrained(finetuned)
    try:
        secure = secure_model.generate(ids, max_new_tokens=3, do_sample=False)
    finally:
        secure_model.close()
    assert secure.tolist() == plain.sequences.tolist(), (tokenizer.decode(secure[0]), tokenizer.decode(plain.sequences[0]))
