"""Fine-tune a HuggingFace causal LM on a text file with ``transformers.Trainer``.

``cryptogen finetune`` and ``scripts/finetune.py`` are thin wrappers around
``finetune()``. The output folder is an ordinary checkpoint (config.json,
model.safetensors, generation_config.json, tokenizer files): load it with
``AutoModelForCausalLM`` or, for GPT-2 architectures, securely with
``CryptoGenForCausalLM.from_pretrained(output_dir)``, with no conversion step.

Nothing here is specific to the secure path. What the secure path needs from
a checkpoint beyond its weights, the LayerNorm pre-scales
(``cryptogen_hf/server/calibration.py``), is computed by the server every
time it loads a checkpoint (``server/serve.py: load_hosted_model``), from the
loaded weights and a fixed calibration text; a fine-tuned model is therefore
recalibrated automatically and there is nothing to store.

The text is tokenized once (no special tokens, the tokenizer's EOS appended),
cut into non-overlapping blocks of ``block_size`` tokens (the remainder is
dropped), and the Trainer draws shuffled batches of blocks. The loss before and
after is measured on the evaluation file if one is given, else on the training
blocks, with dropout off.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cli_common import CLIError, load_pretrained, model_source, positive_float, positive_int


class BlockDataset(torch.utils.data.Dataset):
    """Non-overlapping blocks of a token stream, as causal-LM examples (labels = inputs)."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        n_blocks = ids.numel() // block_size
        self.blocks = ids[: n_blocks * block_size].view(n_blocks, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        block = self.blocks[i]
        return {"input_ids": block, "labels": block}


@dataclass
class FinetuneResult:
    output_dir: str
    base_model: str
    steps: int
    block_size: int
    train_tokens: int
    train_blocks: int
    loss_before: float
    loss_after: float
    loss_on: str  # "train" or the evaluation file
    seconds: float
    log: list = field(default_factory=list)  # the Trainer's log history (loss, learning rate, ...)


def tokenize_file(tokenizer, path: str | Path) -> torch.Tensor:
    text = Path(path).read_text(encoding="utf-8")
    # verbose=False: a whole file is longer than model_max_length, as intended.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def finetune(
    model: str,
    train_file: str | Path,
    output_dir: str | Path,
    *,
    max_steps: int = 100,
    block_size: int = 128,
    batch_size: int = 8,
    lr: float = 5e-5,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    seed: int = 42,
    eval_file: str | Path | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` (a checkpoint folder or hub id) on ``train_file``; save to ``output_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed

    for f in (train_file, eval_file):
        if f is not None and not Path(f).is_file():
            raise CLIError(f"no text file at {str(f)!r}")
    source = model_source(str(model))
    set_seed(seed)
    tokenizer = load_pretrained(AutoTokenizer, source)
    lm = load_pretrained(AutoModelForCausalLM, source, dtype=torch.float32)
    context = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
    if context is not None and block_size > context:
        raise CLIError(f"--block-size {block_size} exceeds the model's context of {context} tokens")

    train_ids = tokenize_file(tokenizer, train_file)
    train_set = BlockDataset(train_ids, block_size)
    if len(train_set) == 0:
        raise CLIError(f"{train_file} has {train_ids.numel()} tokens, fewer than one block of {block_size}; lower --block-size")
    eval_set = BlockDataset(tokenize_file(tokenizer, eval_file), block_size) if eval_file is not None else train_set
    if len(eval_set) == 0:
        raise CLIError(f"{eval_file} has fewer tokens than one block of {block_size}; lower --block-size")

    output_dir = Path(output_dir)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        seed=seed,
        logging_steps=max(1, max_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        prediction_loss_only=True,
    )
    trainer = Trainer(model=lm, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=default_data_collator, processing_class=tokenizer)
    start = time.perf_counter()
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    seconds = time.perf_counter() - start

    lm.eval()
    lm.config.use_cache = True  # the Trainer turns the KV cache off for training; generation wants it
    trainer.save_model(str(output_dir))  # config, safetensors, generation config, tokenizer
    result = FinetuneResult(
        output_dir=str(output_dir),
        base_model=source,
        steps=trainer.state.global_step,
        block_size=block_size,
        train_tokens=int(train_ids.numel()),
        train_blocks=len(train_set),
        loss_before=float(loss_before),
        loss_after=float(loss_after),
        loss_on=str(eval_file) if eval_file is not None else "train",
        seconds=round(seconds, 2),
        log=trainer.state.log_history,
    )
    (output_dir / "finetune_summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


# -- command line (cryptogen finetune, scripts/finetune.py) -----------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (or hub id) of a causal LM to start from")
    parser.add_argument("--train-file", required=True, type=Path, help="plain-text file to train on")
    parser.add_argument("--output-dir", required=True, type=Path, help="where to write the fine-tuned checkpoint")
    parser.add_argument("--eval-file", type=Path, default=None, help="text file for the before/after loss (default: the training blocks)")
    parser.add_argument("--max-steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--block-size", type=positive_int, default=128, help="tokens per training example (default 128)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per step (default 8)")
    parser.add_argument("--lr", type=positive_float, default=5e-5, help="peak learning rate, linear decay (default 5e-5)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = finetune(
        args.model, args.train_file, args.output_dir,
        max_steps=args.max_steps, block_size=args.block_size, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
        eval_file=args.eval_file, progress=not args.quiet,
    )
    print(f"{result.steps} steps on {result.train_blocks} blocks of {result.block_size} tokens in {result.seconds:.1f} s; "
          f"loss on {result.loss_on}: {result.loss_before:.4f} -> {result.loss_after:.4f}")
    print(f"wrote {result.output_dir} (load it with AutoModelForCausalLM, or securely with "
          f"CryptoGenForCausalLM.from_pretrained; the server calibrates it when it loads it)")
    return 0
