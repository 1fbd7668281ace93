#!/usr/bin/env python
"""Train the small models that ship with cryptogen_hf: a GPT-2
(cryptogen_hf/models/tiny-gpt2, --arch gpt2, the default) or a LLaMA-architecture
model (cryptogen_hf/models/tiny-llama, --arch llama).

What it does, in order:
  1. reads the training text (WikiText-2 valid.txt + Tiny Shakespeare input.txt;
     never a test split) and holds out the last --val-fraction of EACH file as a
     validation split, so that validation covers both domains;
  2. trains a byte-level BPE tokenizer (GPT-2 style, one special token
     <|endoftext|> used as bos/eos/unk) on the training part only, or, with
     --tokenizer, reuses the tokenizer of an existing checkpoint folder so that
     two models share token ids;
  3. trains a GPT2LMHeadModel (4 layers, width 192, 4 heads, context 512) or a
     LlamaForCausalLM (RoPE, RMSNorm, SwiGLU MLP, optional grouped-query attention) with
     AdamW, linear warmup + cosine decay, on random contiguous chunks of the
     token stream, under a budget of --steps or --max-minutes, whichever runs
     out first (the cosine follows whichever budget is further along, so a
     time-limited run still ends at the low learning rate);
  4. writes an ordinary HF checkpoint (save_pretrained) plus the tokenizer as a
     PreTrainedTokenizerFast, and a README.md model card, into --out.

Everything is local: no downloads. Example (the command that made the shipped
checkpoint is recorded in its README.md):

    python scripts/train_small_model.py
    python scripts/train_small_model.py --arch llama --tokenizer cryptogen_hf/models/tiny-gpt2 \
        --n-layer 4 --n-embd 192 --n-head 4 --n-kv-head 2 --intermediate-size 512
    python scripts/train_small_model.py --n-layer 2 --distill-from cryptogen_hf/models/tiny-gpt2 \
        --tokenizer cryptogen_hf/models/tiny-gpt2 --out cryptogen_hf/models/tiny-gpt2-draft
    python scripts/train_small_model.py --steps 50 --out /tmp/tiny   # smoke test

With --distill-from TEACHER the model learns the teacher's next-token
distributions (KL divergence, mixed half and half with the data's cross
entropy): a draft model for speculative decoding, whose worth is how often its
greedy token equals the teacher's.
"""

import argparse
import json
import math
import os
import random
import shlex
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
DEFAULT_TRAIN_FILES = [
    DATA / "wikitext-2" / "valid.txt",
    DATA / "tinyshakespeare" / "input.txt",
]
DEFAULT_OUT = {
    "gpt2": REPO / "cryptogen_hf" / "models" / "tiny-gpt2",
    "llama": REPO / "cryptogen_hf" / "models" / "tiny-llama",
}
EOT = "<|endoftext|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", type=Path, default=DEFAULT_TRAIN_FILES,
                   help="training text files (default: WikiText-2 valid.txt and Tiny Shakespeare input.txt)")
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2",
                   help="model architecture: GPT2LMHeadModel or LlamaForCausalLM")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for the HF checkpoint (default: cryptogen_hf/models/tiny-gpt2 "
                        "or cryptogen_hf/models/tiny-llama, by --arch)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="fraction held out from the END of each file for validation")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocab to fit (ignored with --tokenizer)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="checkpoint folder whose tokenizer to reuse instead of fitting one "
                        "(e.g. cryptogen_hf/models/tiny-gpt2); vocab_size is taken from it")
    # model (GPT-2 or LLaMA architecture, scaled down). The GPT-2 names are kept
    # for both; for llama they map to hidden_size, num_hidden_layers,
    # num_attention_heads and max_position_embeddings.
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=512)
    p.add_argument("--n-kv-head", type=int, default=None,
                   help="llama only: key/value heads (grouped-query attention; default --n-head, i.e. none)")
    # GPT-2's MLP is 4 * n_embd wide with two matrices; the SwiGLU MLP has three,
    # so LLaMA uses ~8/3 * n_embd to keep the same parameter count.
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="llama only: MLP width (default 8/3 * --n-embd, rounded up to a multiple of 64)")
    # GPT-2 uses 0.1; the default budget sees only ~5 epochs, a compute-limited
    # regime where dropout costs more loss than it saves.
    p.add_argument("--dropout", type=float, default=0.0,
                   help="gpt2: resid/embd/attn dropout; llama: attention dropout (LLaMA has no other)")
    # optimisation
    p.add_argument("--block-size", type=int, default=256, help="tokens per training chunk")
    p.add_argument("--batch-size", type=int, default=16, help="chunks per step")
    # Measured 0.8-1.15 s/step (16x256 tokens, 3.5-5k tokens/s) on 2 idle CPU
    # cores, so 1000 steps is ~14-19 minutes; --max-minutes caps it when busy.
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (sets the cosine schedule length)")
    # The CPUs here are shared with other jobs, so step time varies 0.8-4 s;
    # the time budget keeps the default run near 17 minutes of training.
    p.add_argument("--max-minutes", type=float, default=17.0,
                   help="wall-clock budget for the training loop (0 = none, a pure step budget, "
                        "which makes a seeded run exactly reproducible)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation passes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--distill-from", type=Path, default=None,
                   help="a checkpoint folder to distil (a draft model for speculative decoding); needs --tokenizer "
                        "naming a folder with the same tokenizer")
    p.add_argument("--assistant-tokens", type=int, default=1,
                   help="with --distill-from: tokens the draft proposes per check (its generation_config's "
                        "num_assistant_tokens, a constant schedule)")
    args = p.parse_args(argv)

    # Check the architecture options here, before minutes of tokenizing and training.
    if args.arch == "gpt2":
        for name in ("n_kv_head", "intermediate_size"):
            if getattr(args, name) is not None:
                p.error(f"--{name.replace('_', '-')} applies to --arch llama only")
    else:
        if args.n_kv_head is None:
            args.n_kv_head = args.n_head
        if args.intermediate_size is None:
            args.intermediate_size = math.ceil(8 * args.n_embd / 3 / 64) * 64
        if args.n_head % args.n_kv_head != 0:
            p.error(f"--n-head {args.n_head} must be a multiple of --n-kv-head {args.n_kv_head}")
    if args.n_embd % args.n_head != 0:
        p.error(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    if args.distill_from is not None and args.tokenizer is None:
        p.error("--distill-from needs --tokenizer (the teacher's token ids)")
    if args.out is None:
        args.out = DEFAULT_OUT[args.arch]
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_and_split(files, val_fraction):
    """Return (train_texts, val_texts): the last val_fraction of each file is validation.

    The cut is moved forward to the next newline so no line is split in two.
    """
    train_texts, val_texts = [], []
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        cut = int(len(text) * (1.0 - val_fraction))
        nl = text.find("\n", cut)
        cut = nl + 1 if nl != -1 else cut
        train_texts.append(text[:cut])
        val_texts.append(text[cut:])
    return train_texts, val_texts


def train_tokenizer(train_texts, vocab_size):
    # add_prefix_space=False as GPT-2: the byte-level decode is then an exact
    # inverse of encode, which the secure backend relies on when it streams text.
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(train_texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOT], show_progress=False)
    return tok


def wrap_tokenizer(tok, model_max_length):
    """Wrap the tokenizers object as a transformers PreTrainedTokenizerFast (GPT-2 style)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=model_max_length,
        # GPT-2's clean-up would rewrite " n't" -> "n't" etc. and break exact round trips.
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )


def load_tokenizer(folder, model_max_length):
    """The tokenizer of an existing checkpoint folder, reused unchanged.

    Both shipped models read the same token ids this way, so one prompt encodes
    the same for either. Only model_max_length follows this run's --n-positions.
    """
    hf_tok = PreTrainedTokenizerFast.from_pretrained(folder)
    if EOT not in hf_tok.get_vocab():
        sys.exit(f"{folder}: the tokenizer has no {EOT} token, which this script uses as bos/eos")
    hf_tok.model_max_length = model_max_length
    return hf_tok


def build_model(args, vocab_size, eot_id):
    """A freshly initialised GPT2LMHeadModel or LlamaForCausalLM, by --arch."""
    if args.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=args.n_positions,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            activation_function="gelu_new",
            resid_pdrop=args.dropout,
            embd_pdrop=args.dropout,
            attn_pdrop=args.dropout,
            bos_token_id=eot_id,
            eos_token_id=eot_id,
            tie_word_embeddings=True,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.n_embd,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.n_kv_head,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.n_positions,
        # rope_theta as a plain keyword: transformers 5 stores it in
        # rope_parameters, 4.x as rope_theta; 10000 is also 4.x's default, so
        # either version reads the saved config the same way.
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=args.dropout,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        # Tied as in tiny-gpt2: at this size an untied head would add 0.8 M
        # parameters (a third of the model) for little gain.
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def fix_tokenizer_files(out):
    """Make the saved tokenizer files loadable by older transformers too.

    transformers 5 writes tokenizer_class "TokenizersBackend" and no
    special_tokens_map.json; 4.x needs "PreTrainedTokenizerFast" and reads the
    map. Both versions load the files written here (5.x aliases the class name).
    """
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # A tokenizer loaded with from_pretrained (--tokenizer) keeps these load-time
    # options in its init kwargs and save_pretrained writes them out; they
    # describe that one load, not the tokenizer, so leave them out.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token") if k in cfg}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def placeholder_bans(hf_tok) -> list[list[int]]:
    """bad_words_ids for the generation config: the tokens that open WikiText's
    `<unk>` placeholder ("<" and " <"). The model learns the placeholder as
    text (11,718 times in valid.txt; "<" occurs 3 times otherwise), and
    generate() would write it; banning its first token keeps it out."""
    return [[ids[0]] for ids in sorted({tuple(hf_tok(s).input_ids) for s in ("<unk>", " <unk>")})]


def encode_texts(hf_tok, texts):
    """Tokenize each text and join them with <|endoftext|>, as GPT-2 joins documents."""
    eot_id = hf_tok.convert_tokens_to_ids(EOT)
    ids = []
    for t in texts:
        # verbose=False: whole files are longer than model_max_length, as intended.
        ids.extend(hf_tok(t, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.long)


def budget_fraction(step, elapsed_s, args):
    """How much of the budget is used: the larger of the step and time fractions."""
    frac = step / args.steps
    if args.max_minutes > 0:
        frac = max(frac, elapsed_s / (args.max_minutes * 60))
    return frac


def lr_at(step, frac, args):
    """Linear warmup (in steps) to args.lr, then cosine decay to args.lr * min_lr_ratio.

    The cosine runs over the budget fraction `frac` (see budget_fraction) from
    where warmup ended, so it reaches its floor when either budget runs out.
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    warm_frac = args.warmup_steps / args.steps
    progress = min(1.0, max(0.0, (frac - warm_frac) / max(1e-9, 1.0 - warm_frac)))
    cos = 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def random_batch(data, block_size, batch_size, gen):
    """batch_size contiguous chunks of block_size tokens at random offsets."""
    starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=gen)
    return torch.stack([data[s:s + block_size] for s in starts.tolist()])


@torch.no_grad()
def whole_chunks(data, block_size):
    """The split as non-overlapping block_size chunks (the tail that does not fill one is dropped)."""
    n_chunks = (len(data) - 1) // block_size
    return data[: n_chunks * block_size].view(n_chunks, block_size)


def evaluate(model, data, block_size, batch_size):
    """Mean token NLL over non-overlapping chunks of data (the whole split, deterministic)."""
    model.eval()
    chunks = whole_chunks(data, block_size)
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        x = chunks[i:i + batch_size]
        loss = model(input_ids=x, labels=x).loss  # HF shifts labels internally
        n = x.shape[0] * (block_size - 1)
        total += loss.item() * n
        count += n
    model.train()
    return total / count


def training_loss(model, x, teacher=None):
    """The data's cross entropy; with a teacher, its mean with KL(teacher || model)
    over every position's next-token distribution."""
    out = model(input_ids=x, labels=x)
    if teacher is None:
        return out.loss
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(out.logits, dim=-1), target, log_target=True, reduction="none")
    return 0.5 * out.loss + 0.5 * kl.sum(-1).mean()


def agreement(model, teacher, data, block_size, batch_size):
    """How often the model's greedy next token equals the teacher's (over the
    split's non-overlapping chunks): a draft's acceptance rate in greedy
    speculative decoding, one token at a time."""
    model.eval()
    chunks = whole_chunks(data, block_size)
    same = count = 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch_size):
            x = chunks[i:i + batch_size]
            same += (model(input_ids=x).logits.argmax(-1) == teacher(input_ids=x).logits.argmax(-1)).sum().item()
            count += x.numel()
    model.train()
    return same / count


def param_count(model):
    # Tied lm_head shares the embedding matrix; count unique tensors only.
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def display_path(path):
    """path relative to the repository when it lies inside it (as the cards show paths), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def model_card_parts(args, info):
    """The parts of the model card that differ by architecture: (intro, model table rows)."""
    tokenizer = ("its own byte-level BPE tokenizer" if info["tokenizer_source"] is None
                 else f"the tokenizer of `{info['tokenizer_source']}`")
    if args.arch == "gpt2":
        intro = f"""A small GPT-2 (`GPT2LMHeadModel`) with {tokenizer}, trained
from scratch on CPU by `scripts/train_small_model.py`. It exists so the secure
text-generation backend has a real, self-contained HuggingFace model to run
on; it is not a good language model."""
        rows = f"""| n_layer | {args.n_layer} |
| n_embd | {args.n_embd} |
| n_head | {args.n_head} |
| n_positions | {args.n_positions} |
| vocab_size | {info['vocab_size']} |
| activation | gelu_new |
| tied input/output embeddings | yes |
| dropout (resid/embd/attn) | {args.dropout} |"""
        return intro, rows
    grouping = ("no grouping: one key/value head per query head" if args.n_kv_head == args.n_head
                else f"grouped-query attention, {args.n_head // args.n_kv_head} query heads per key/value head")
    gqa = ", grouped-query attention" if args.n_kv_head < args.n_head else ""
    # Filled to 78 columns: the tokenizer path makes the line lengths vary.
    intro = textwrap.fill(
        f"A small LLaMA-architecture model (`LlamaForCausalLM`) with {tokenizer}, trained "
        f"from scratch on CPU by `scripts/train_small_model.py`. It exists so the project "
        f"has a real, self-contained HuggingFace model of the LLaMA family (RoPE, RMSNorm, "
        f"SwiGLU MLP{gqa}, no biases) beside tiny-gpt2; it is not a good language model.",
        width=78, break_long_words=False, break_on_hyphens=False)
    rows = f"""| num_hidden_layers | {args.n_layer} |
| hidden_size | {args.n_embd} |
| num_attention_heads | {args.n_head} (head dim {args.n_embd // args.n_head}) |
| num_key_value_heads | {args.n_kv_head} ({grouping}) |
| intermediate_size | {args.intermediate_size} (SwiGLU: gate, up and down projections) |
| max_position_embeddings | {args.n_positions} |
| position encoding | RoPE, theta 10000 |
| normalization | RMSNorm (pre-norm), eps 1e-5 |
| activation | silu |
| biases | none (attention_bias, mlp_bias false) |
| vocab_size | {info['vocab_size']} |
| tied input/output embeddings | yes |
| attention dropout | {args.dropout} |"""
    return intro, rows


def write_model_card(out, args, info):
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    data_lines = "\n".join(f"- `{d}`" for d in info["data_files"])
    intro, model_rows = model_card_parts(args, info)
    if info["tokenizer_source"] is None:
        fitting = "training or tokenizer fitting"
        tokenizer_section = f"""Byte-level BPE (`tokenizers`), vocab {info['vocab_size']}, GPT-2 style: no prefix
space, one special token `<|endoftext|>` (id {info['eot_id']}) used as bos/eos/unk,
no pad token. Saved as a `PreTrainedTokenizerFast`; `decode(encode(s)) == s`."""
    else:
        fitting = "training"
        tokenizer_section = f"""Reused unchanged from `{info['tokenizer_source']}` (not refit here; see that
folder's card for how it was made), so both models read the same token ids.
Vocab {info['vocab_size']}; `<|endoftext|>` (id {info['eot_id']}) is bos/eos. Saved here as a
`PreTrainedTokenizerFast` with the model, so the folder is self-contained."""
    # The default tiny-gpt2 folder is the one the package exports (SHIPPED_MODEL_DIR,
    # also eval's default model); name any other folder by its path.
    if out.resolve() == DEFAULT_OUT["gpt2"]:
        use = """import cryptogen_hf
tok = AutoTokenizer.from_pretrained(cryptogen_hf.SHIPPED_MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(cryptogen_hf.SHIPPED_MODEL_DIR)"""
        eval_model = ""
    else:
        use = f"""tok = AutoTokenizer.from_pretrained("{display_path(out)}")
model = AutoModelForCausalLM.from_pretrained("{display_path(out)}")"""
        eval_model = f" --model {shlex.quote(display_path(out))}"
    distilled = "" if info["distilled_from"] is None else f"""
Distilled from `{info['distilled_from']}` (the loss is the mean of the data's cross
entropy and the KL divergence from the teacher's next-token distribution). Its
greedy next token equals the teacher's at {info['val_greedy_agreement']:.1%} of the
validation positions: the acceptance rate of one drafted token in greedy
speculative decoding (`generate(..., assistant_model=...)`).
"""
    card = f"""# {out.name} (cryptogen_hf shipped model)

{intro}

## Data

Training text (the last {args.val_fraction:.0%} of each file held out for validation):

{data_lines}

WikiText-2 is the PyTorch word-language-model version (`<unk>` for rare words,
` @-@ ` for hyphens). No test split was used for {fitting}.
Train tokens: {info['n_train_tokens']:,}; validation tokens: {info['n_val_tokens']:,}
(documents joined with `<|endoftext|>`). The model learns the `<unk>`
placeholder as text; `generation_config.json` bans the tokens that open it
(`bad_words_ids`: "<" and " <"), so `generate()` does not write it.

## Tokenizer

{tokenizer_section}

## Model

| hyper-parameter | value |
|---|---|
{model_rows}
| parameters (unique) | {info['n_params']:,} |
| weights dtype | float32 |

## Training

| setting | value |
|---|---|
| optimizer | AdamW (betas 0.9, 0.95), weight decay {args.weight_decay} on matrices |
| peak lr | {args.lr} |
| schedule | linear warmup {args.warmup_steps} steps, cosine to {args.lr * args.min_lr_ratio:g} over the budget |
| budget | {args.steps} steps or {args.max_minutes:g} minutes, whichever first (0 = no time limit) |
| block size | {args.block_size} |
| batch | {args.batch_size} random contiguous chunks ({args.batch_size * args.block_size} tokens/step) |
| steps run / step budget | {info['steps_done']} / {args.steps} |
| tokens seen | {info['tokens_seen']:,} (~{info['epochs']:.1f} epochs) |
| grad clip | {args.grad_clip} |
| seed | {args.seed} |
| wall time | {info['train_minutes']:.1f} min on {info['threads']} CPU threads ({info['tokens_per_s']:.0f} tokens/s) |

Final losses (mean token NLL, nats; train = the first 200k training tokens; non-overlapping {args.block_size}-token chunks, dropout off):

| split | loss | perplexity |
|---|---|---|
| train | {info['train_loss']:.4f} | {math.exp(info['train_loss']):.2f} |
| validation | {info['val_loss']:.4f} | {math.exp(info['val_loss']):.2f} |
{distilled}
{info['stop_note']}

## Reproduce

```
{cmd}
```

The machine's CPUs were shared with other jobs, so the time budget, not the
step budget, decided the step count; with a time budget the run is seeded but
not bit-reproducible. `--max-minutes 0 --steps N` gives a pure step budget.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
{use}
```

Perplexity: `python scripts/eval_ppl.py{eval_model} --data <path>/wikitext-2/test.txt`.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    for f in args.data:
        if "test" in Path(f).name:
            sys.exit(f"refusing to train on a test split: {f}")

    # 1. data and split
    train_texts, val_texts = read_and_split(args.data, args.val_fraction)

    # 2. tokenizer (fit on the training part only, or reused from --tokenizer)
    t0 = time.time()
    if args.tokenizer is not None:
        hf_tok = load_tokenizer(args.tokenizer, args.n_positions)
        how = f"loaded from {args.tokenizer}"
    else:
        bpe = train_tokenizer(train_texts, args.vocab_size)
        hf_tok = wrap_tokenizer(bpe, args.n_positions)
        how = "trained"
    vocab_size = len(hf_tok)
    eot_id = hf_tok.convert_tokens_to_ids(EOT)
    train_ids = encode_texts(hf_tok, train_texts)
    val_ids = encode_texts(hf_tok, val_texts)
    print(f"tokenizer: vocab {vocab_size}, {how} in {time.time() - t0:.1f}s; "
          f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens")

    # 3. model (and the teacher it distils, if any)
    teacher = None
    if args.distill_from is not None:
        teacher = AutoModelForCausalLM.from_pretrained(args.distill_from).eval()
        if teacher.config.vocab_size != vocab_size:
            sys.exit(f"--distill-from {args.distill_from} has vocabulary {teacher.config.vocab_size}, the tokenizer {vocab_size}")
        print(f"distilling {args.distill_from}")
    model = build_model(args, vocab_size, eot_id)
    model.train()
    n_params = param_count(model)
    print(f"model: {args.arch}, {n_params:,} parameters")

    # Weight decay only on matrices (not biases, LayerNorm/RMSNorm gains), the usual GPT recipe.
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    stop_note = f"Training ran the full {args.steps} planned steps."
    step = 0
    ema = None
    bar = tqdm(total=args.steps, desc="train", dynamic_ncols=True)
    while step < args.steps:
        frac = budget_fraction(step, time.time() - start, args)
        if frac >= 1.0:
            stop_note = (f"Training used its --max-minutes {args.max_minutes:g} time budget after {step} of "
                         f"at most {args.steps} steps (the cosine schedule followed the time budget, so "
                         f"the learning rate still reached its floor).")
            break
        lr = lr_at(step, frac, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = random_batch(train_ids, args.block_size, args.batch_size, gen)
        loss = training_loss(model, x, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if step % args.eval_every == 0 and step < args.steps:
            vl = evaluate(model, val_ids, args.block_size, args.batch_size)
            tqdm.write(f"step {step}: train(ema) {ema:.4f}  val {vl:.4f}  ({(time.time() - start) / 60:.1f} min)")
    bar.close()
    train_seconds = time.time() - start
    tokens_seen = step * args.batch_size * args.block_size
    print(stop_note)

    # Final numbers with dropout off. The train loss is on a fixed 200k-token
    # prefix so it is cheap and comparable to the validation loss.
    val_loss = evaluate(model, val_ids, args.block_size, args.batch_size)
    train_loss = evaluate(model, train_ids[:200_000], args.block_size, args.batch_size)
    val_agreement = None if teacher is None else agreement(model, teacher, val_ids, args.block_size, args.batch_size)
    if val_agreement is not None:
        print(f"greedy agreement with {args.distill_from} on validation: {val_agreement:.1%}")
    print(f"final: train loss {train_loss:.4f} (ppl {math.exp(train_loss):.2f}), "
          f"val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}); "
          f"{step} steps, {tokens_seen:,} tokens in {train_seconds / 60:.1f} min")

    # 4. save: float32 weights, safetensors, tokenizer, model card
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.bos_token_id = eot_id
    model.generation_config.eos_token_id = eot_id
    model.generation_config.pad_token_id = eot_id  # silences generate()'s pad warning
    model.generation_config.bad_words_ids = placeholder_bans(hf_tok)
    if teacher is not None:
        # How many tokens the draft proposes per check when it is a
        # generate(assistant_model=...): a constant k (a heuristic schedule
        # would change the check's length with the acceptance, and a
        # confidence cut-off would end drafts early on a small model's flat
        # distributions); k is set from scripts/bench_generation.py --speculative.
        model.generation_config.num_assistant_tokens = args.assistant_tokens
        model.generation_config.num_assistant_tokens_schedule = "constant"
        model.generation_config.assistant_confidence_threshold = 0.0
    model.save_pretrained(args.out, safe_serialization=True)
    hf_tok.save_pretrained(args.out)
    fix_tokenizer_files(args.out)
    info = {
        "arch": args.arch,
        "model_class": type(model).__name__,
        "tokenizer_source": display_path(args.tokenizer) if args.tokenizer is not None else None,
        "data_files": [os.path.relpath(Path(f).resolve(), REPO.parent) for f in args.data],
        "n_train_tokens": len(train_ids),
        "n_val_tokens": len(val_ids),
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "n_params": n_params,
        "steps_done": step,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_ids),
        "train_minutes": train_seconds / 60,
        "threads": torch.get_num_threads(),
        "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "distilled_from": display_path(args.distill_from) if teacher is not None else None,
        "val_greedy_agreement": val_agreement,
        "stop_note": stop_note,
    }
    write_model_card(args.out, args, info)
    (args.out / "training_summary.json").write_text(
        json.dumps({**info, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
          + f"; total {sum(sizes.values()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
