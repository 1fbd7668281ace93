#!/usr/bin/env python
"""Fine-tune a HuggingFace causal LM on a text file: the same as ``cryptogen finetune``.

The code is cryptogen_hf/finetune.py (transformers ``Trainer``); ``--help``
lists every option (--model, --train-file, --output-dir, --max-steps,
--block-size, --batch-size, --lr, --seed, --eval-file, ...).

    python scripts/finetune.py --model cryptogen_hf/models/tiny-gpt2 \\
        --train-file ../shared/data/tinyshakespeare/input.txt --output-dir runs/shakespeare --max-steps 200

The output folder is an ordinary checkpoint (config.json, model.safetensors,
tokenizer files). Load it as usual, or securely with no conversion step:

    CryptoGenForCausalLM.from_pretrained("runs/shakespeare")

The secure path's LayerNorm calibration (public pre-scales, see
cryptogen_hf/server/calibration.py) is computed automatically by the server
each time it loads a checkpoint, from that checkpoint's weights, so a
fine-tuned model needs no extra step.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cryptogen_hf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
