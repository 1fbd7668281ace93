"""Shared fixtures: a tiny random GPT-2 checkpoint and a real `cryptogen serve` process on it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from knowledge_recorder import ENV as KNOWLEDGE_ENV
from transcript_recorder import ENV as TRANSCRIPT_ENV


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=300, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


def start_server(checkpoint, settings=None, settings_path=None, transcript_dir=None, knowledge_dir=None):
    """`cryptogen serve` in its own process group (so a test can kill it and its session workers).

    settings: a CryptoGenConfig for the server, saved to ``settings_path``.
    transcript_dir: record every byte the server's processes receive there
        (``tests/transcript_recorder.py``).
    knowledge_dir: record that and everything they hold (``tests/knowledge_recorder.py``).
    Returns (process, port).
    """
    command = [sys.executable, "-m", "cryptogen_hf.cli", "serve", "--model", str(checkpoint), "--quiet"]
    env = None
    if transcript_dir is not None:
        command[1:3] = [str(Path(__file__).with_name("transcript_recorder.py"))]
        env = {**os.environ, TRANSCRIPT_ENV: str(transcript_dir)}
    if knowledge_dir is not None:
        command[1:3] = [str(Path(__file__).with_name("knowledge_recorder.py"))]
        env = {**os.environ, KNOWLEDGE_ENV: str(knowledge_dir)}
    if settings is not None:
        settings.save(settings_path)
        command += ["--config", str(settings_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("CRYPTOGEN_LISTENING"), line
    return proc, int(line.rsplit(":", 1)[1])


def stop_server(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture()
def server(tiny_checkpoint):
    proc, port = start_server(tiny_checkpoint)
    yield proc, port
    stop_server(proc)
