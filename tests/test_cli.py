"""The `cryptogen` command line: help, user errors, secure perplexity, bench.

Help and user errors go through ``cryptogen_hf.cli.main`` in this process
(the same code the console script runs; starting a Python per case would
cost seconds each); the entry points themselves, secure eval and bench run
as real processes.
"""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cryptogen_hf import SHIPPED_MODEL_DIR
from cryptogen_hf.cli import main
from cryptogen_hf.eval.perplexity import hf_model_fn, sliding_window_nll
from cryptogen_hf.protocol.session import ClientSession, HandshakeError

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["credentials", "serve", "generate", "eval", "bench", "finetune"]
TEXT = ("The quiet harbour town kept its old lighthouse burning every night for the fishing boats "
        "that came home late, and the keeper wrote the weather in a book.\n")


def cryptogen(*args, timeout=300):
    """`python -m cryptogen_hf.cli ARGS` as a child process."""
    return subprocess.run([sys.executable, "-m", "cryptogen_hf.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def cryptogen_main(capsys, *args):
    """`cryptogen ARGS` through main() in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer random GPT-2 with the shipped tokenizer (so `eval` can tokenize text).

    initializer_range 0.2 (GPT-2 uses 0.02) spreads the logits (std ~1.6), so
    the perplexity is far from the uniform one and logit errors would show.
    """
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2-tok")
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_help_of_every_subcommand_and_script(capsys):
    top = cryptogen("--help")  # the module entry point, in its own process
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
    for name in SUBCOMMANDS:
        code, out, err = cryptogen_main(capsys, name, "--help")
        assert code == 0, err
        assert out.startswith(f"usage: cryptogen {name}"), out[:200]
        assert ("--host" if name == "credentials" else "--model") in out
    # The scripts are thin wrappers of the subcommands.
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_ppl.py"), "--help"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and "--secure" in result.stdout, result.stderr


def test_missing_model_folder_is_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    commands = {
        "eval": ["--model", missing, "--data", text],
        "bench": ["--model", missing, "--contexts", 4],
        "finetune": ["--model", missing, "--train-file", text, "--output-dir", tmp_path / "out"],
        "serve": ["--model", missing],
        "generate": ["--model", missing, "--prompt", "Hi"],
    }
    for name, args in commands.items():
        code, _, err = cryptogen_main(capsys, name, *args)
        assert code == 2, (name, err)
        assert err.strip() == f"cryptogen {name}: error: no model folder at {str(missing)!r} " \
            "(give a checkpoint folder with config.json; nothing is downloaded)", (name, err)
    result = cryptogen("eval", "--model", missing, "--data", text)  # and from a real process: no traceback
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cryptogen eval: error: no model folder at {str(missing)!r}" in result.stderr


def test_bad_arguments_are_refused_with_a_reason(tmp_path, tiny_checkpoint, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cases = [
        (["eval", "--model", tiny_checkpoint, "--data", text, "--window", 8, "--stride", 8],
         "--stride 8 must be smaller than the window 8"),
        (["eval", "--model", tiny_checkpoint, "--data", text, "--window", 65], "exceeds the model context 64"),
        (["eval", "--model", tiny_checkpoint, "--data", tmp_path / "missing.txt"], "no text file at"),
        (["eval", "--model", tmp_path / "text.txt", "--data", text], "is a file, not a checkpoint folder"),
        (["bench", "--model", tiny_checkpoint, "--contexts", 200], "context 200 must be in 2..62"),
        (["bench", "--contexts", 0], "must be a positive integer"),  # argparse: usage and the reason
        (["finetune", "--model", tiny_checkpoint, "--train-file", text, "--output-dir", tmp_path / "o",
          "--block-size", 100], "--block-size 100 exceeds the model's context of 64 tokens"),
        (["generate", "--prompt", "Hi"], "give --model PATH (local server) or --server HOST:PORT"),
        (["generate", "--model", tiny_checkpoint, "--prompt", "Hi", "--prompt-lookup", 2],
         "add --speculative-reveals-acceptance to accept that"),
        (["generate", "--model", tiny_checkpoint, "--prompt", "Hi", "--prompt-lookup", 2, "--draft", tiny_checkpoint,
          "--speculative-reveals-acceptance"], "--draft and --prompt-lookup are two ways to draft tokens: give one"),
        (["bench", "--model", tiny_checkpoint, "--speculative", tiny_checkpoint, "--prompt-tokens", 40, "--new-tokens", 30],
         "exceed the model's context of 64"),
        (["bench", "--model", tiny_checkpoint, "--prefill", "--lengths", 4, "--net", "wan"],
         "--net goes with the latency benchmark (--contexts), not with --prefill or --speculative"),
    ]
    for args, reason in cases:
        code, _, err = cryptogen_main(capsys, *args)
        assert code == 2 and reason in err, (args, err[-2000:])


@pytest.fixture(scope="module")
def secure_cli_runs(tmp_path_factory, tiny_checkpoint):
    """The CLI's secure runs, three at once (each its own server; a secure step
    is half waiting for the peer): `eval --secure` on the tiny GPT-2; `bench`,
    latency against context, on a LLaMA-architecture model (grouped-query
    attention), its server in a network namespace of its own, first over an
    unshaped link, then over the emulated WAN (`--net loopback wan`; the cache
    filled at random, `--fill`, so that only the decode step pays the WAN's
    round trips); `bench --prefill` on a GPT-2: time to first token, packed and
    token by token, at each length."""
    tmp = tmp_path_factory.mktemp("cli-runs")
    text = tmp / "text.txt"
    text.write_text(TEXT)
    torch.manual_seed(0)  # as tests/test_sessions.py: bench needs no tokenizer, and a small vocabulary is quicker
    llama_dir, gpt2_dir = tmp / "tiny-llama", tmp / "tiny-gpt2"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64, vocab_size=300)).save_pretrained(llama_dir)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=300)).save_pretrained(gpt2_dir)
    outs = {"eval": tmp / "secure.json", "latency": tmp / "bench.json", "prefill": tmp / "prefill.json"}
    commands = {
        "eval": ("eval", "--model", tiny_checkpoint, "--data", text, "--secure", "--max-tokens", 12, "--window", 8,
                 "--json", outs["eval"]),
        "latency": ("bench", "--model", llama_dir, "--contexts", 6, "--decode-tokens", 1, "--fill", "--net", "loopback", "wan",
                    "--out", outs["latency"]),
        "prefill": ("bench", "--model", gpt2_dir, "--prefill", "--lengths", 2, 7, "--baseline-lengths", 7,
                    "--out", outs["prefill"]),
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {name: pool.submit(cryptogen, *args) for name, args in commands.items()}
        return {name: (future.result(), outs[name]) for name, future in futures.items()}


def test_eval_secure_perplexity_matches_plaintext(secure_cli_runs, tiny_checkpoint):
    result, out = secure_cli_runs["eval"]
    assert result.returncode == 0, result.stderr[-3000:]
    secure = json.loads(out.read_text())
    assert secure["secure"] and secure["n_tokens_evaluated"] == 12 and secure["n_tokens_scored"] == 11
    assert secure["window"] == 8 and secure["stride"] == 4 and secure["n_windows"] == 2
    assert "first 12 of" in result.stdout  # the slice is stated

    # The plaintext perplexity of the same 12 tokens, same windows, computed here.
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:12]
    plain = sliding_window_nll(hf_model_fn(GPT2LMHeadModel.from_pretrained(tiny_checkpoint)), ids, window=8, stride=4)
    assert abs(plain.ppl - len(tokenizer)) > 0.5 * len(tokenizer)  # far from uniform: the test can tell
    assert abs(secure["ppl"] - plain.ppl) / plain.ppl < 0.01, (secure["ppl"], plain.ppl)


def test_bench_writes_json_and_plot(secure_cli_runs):
    latency, out = secure_cli_runs["latency"]
    assert latency.returncode == 0, latency.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["shape"]["family"] == "llama" and report["shape"]["n_kv_head"] == 2
    assert report["dealer"] == "none" and [(r["context"], r["network"]) for r in report["rows"]] == [(6, "loopback"), (6, "wan")]
    for row in report["rows"]:
        assert row["decode_s_per_token"] > 0 and row["cache_tokens"] == row["context"] and row["cache_bytes"] > 0
    # The session really crossed the emulated WAN: the link measured as set, and a
    # decode step waited on its round trips (the tiny model's step makes hundreds of exchanges).
    # The recompute baseline, a comparison of work, runs under the first condition only.
    loopback, wan = report["rows"]
    assert loopback["recompute_s_per_token"] > 0 and "recompute_s_per_token" not in wan
    assert wan["network_measured"]["rtt_ms"] >= 40 and loopback["network_measured"]["rtt_ms"] < 20
    assert wan["decode_s_per_token"] > loopback["decode_s_per_token"] + 1.0, (loopback, wan)
    assert out.with_suffix(".png").stat().st_size > 10_000

    prefill, prefill_out = secure_cli_runs["prefill"]
    assert prefill.returncode == 0, prefill.stderr[-3000:]
    report = json.loads(prefill_out.read_text())
    assert [(r["prompt_tokens"], r["path"]) for r in report["rows"]] == [(2, "packed"), (7, "token by token"), (7, "packed")]
    for row in report["rows"]:
        assert row["time_to_first_token_s"] > 0 and row["server_breakdown_s"]["embedding"] > 0
    assert report["rows"][1]["packed_speedup"] == report["rows"][2]["packed_speedup"] > 0
    assert report["decode_s_per_token_after_longest_prompt"] > 0
    assert prefill_out.with_suffix(".png").stat().st_size > 10_000


def test_two_machine_recipe_from_the_readme_over_tls(tmp_path, tiny_checkpoint, capsys):
    """`cryptogen credentials`, `serve --cert --key --tokens`, `generate --server
    --server-cert --token-file`, as the README runs them (on loopback)."""
    creds = tmp_path / "creds"
    code, out, err = cryptogen_main(capsys, "credentials", "--host", "127.0.0.1", "--out", creds)
    assert code == 0 and "server.pem" in out, err
    assert {p.name for p in creds.iterdir()} == {"server.pem", "server.key", "tokens.txt", "client.token"}
    assert all((creds / name).stat().st_mode & 0o077 == 0 for name in ("server.key", "tokens.txt", "client.token"))
    code, _, err = cryptogen_main(capsys, "serve", "--model", tiny_checkpoint, "--quiet")  # no credentials: refused at once
    assert code == 2 and "TLS certificate file" in err and "cryptogen credentials" in err, err
    server = subprocess.Popen([sys.executable, "-m", "cryptogen_hf.cli", "serve", "--model", str(tiny_checkpoint), "--quiet",
                               "--host", "127.0.0.1", "--cert", str(creds / "server.pem"), "--key", str(creds / "server.key"),
                               "--tokens", str(creds / "tokens.txt")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        address = server.stdout.readline().split()[-1]
        client = ["generate", "--server", address, "--server-cert", creds / "server.pem", "--tokenizer", tiny_checkpoint,
                  "--prompt", "The quiet harbour", "--max-new-tokens", 3]
        host, port = address.rsplit(":", 1)
        with pytest.raises(HandshakeError, match="does not know that token"):  # (in process: a CLI run costs seconds)
            ClientSession(host, int(port), server_cert=str(creds / "server.pem"), token="z" * 43)
        done = cryptogen(*client, "--token-file", creds / "client.token")
        assert done.returncode == 0, done.stderr[-3000:]
        # Speculative decoding from the command line (in process: a CLI run costs seconds), the
        # tiny model drafting for itself, so every drafted token is accepted.
        code, speculative, err = cryptogen_main(capsys, *client, "--token-file", creds / "client.token",
                                                "--draft", tiny_checkpoint, "--speculative-reveals-acceptance")
        assert code == 0, err[-3000:]
    finally:
        server.kill()
        server.wait()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tokenizer("The quiet harbour", return_tensors="pt").input_ids
    plain = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval().generate(ids, max_new_tokens=3, do_sample=False)
    assert done.stdout.strip().startswith(tokenizer.decode(plain[0]).strip())
    assert speculative.strip().startswith(tokenizer.decode(plain[0]).strip())
    # The prompt's pass, then checks of the drafted tokens: fewer than greedy decoding's 3 passes.
    passes = int(re.search(r"\[3 tokens in .* s/token, (\d+) secure passes\]", err).group(1))
    assert passes < 3, err[-2000:]
