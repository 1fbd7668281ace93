"""Shared fixtures: a tiny random GPT-2 checkpoint and a real `cryptogen serve` process on it."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cryptogen_hf.config import CryptoGenConfig
from cryptogen_hf.protocol import credentials
from knowledge_recorder import ENV as KNOWLEDGE_ENV
from transcript_recorder import ENV as TRANSCRIPT_ENV


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=300, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


@dataclass
class LiveServer:
    """A running test server and the credentials a client needs for it."""

    port: int
    cert: Path  # the server's self-signed certificate: what clients pin
    tokens: dict  # client name -> token ("alice", "bob")
    folder: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_kwargs(self, client: str = "alice") -> dict:
        """from_pretrained's keywords for this server."""
        return {"server": self.address, "server_cert": str(self.cert), "server_token": self.tokens[client]}

    def token_file(self, client: str = "alice") -> Path:
        path = self.folder / f"{client}.token"
        path.write_text(self.tokens[client] + "\n")
        return path

    def session(self, settings=None, client: str = "alice"):
        from cryptogen_hf.protocol.session import ClientSession

        return ClientSession("127.0.0.1", self.port, settings, server_cert=str(self.cert), token=self.tokens[client])


def start_server(checkpoint, settings=None, settings_path=None, transcript_dir=None, knowledge_dir=None):
    """`cryptogen serve` in its own process group (so a test can kill it and its session workers),
    with a fresh self-signed certificate and tokens for two clients, "alice" and "bob".

    settings: a CryptoGenConfig for the server (saved to ``settings_path``, or a temporary file).
    transcript_dir: record every byte the server's processes receive there
        (``tests/transcript_recorder.py``).
    knowledge_dir: record that and everything they hold (``tests/knowledge_recorder.py``).
    Returns (process, LiveServer).
    """
    folder = Path(tempfile.mkdtemp(prefix="cryptogen-test-server-"))
    cert, key = credentials.self_signed_certificate(["127.0.0.1", "localhost"])
    tokens = {name: credentials.new_token() for name in ("alice", "bob")}
    (folder / "server.pem").write_bytes(cert)
    (folder / "server.key").write_bytes(key)
    (folder / "tokens.txt").write_text("".join(f"{name} {token}\n" for name, token in tokens.items()))
    settings = CryptoGenConfig.from_dict(settings.to_dict()) if settings is not None else CryptoGenConfig()
    settings.server.cert_file, settings.server.key_file = str(folder / "server.pem"), str(folder / "server.key")
    settings.server.tokens_file = str(folder / "tokens.txt")
    settings_path = settings_path or folder / "server.yaml"
    settings.save(settings_path)
    command = [sys.executable, "-m", "cryptogen_hf.cli", "serve", "--model", str(checkpoint), "--quiet", "--config", str(settings_path)]
    env = None
    if transcript_dir is not None:
        command[1:3] = [str(Path(__file__).with_name("transcript_recorder.py"))]
        env = {**os.environ, TRANSCRIPT_ENV: str(transcript_dir)}
    if knowledge_dir is not None:
        command[1:3] = [str(Path(__file__).with_name("knowledge_recorder.py"))]
        env = {**os.environ, KNOWLEDGE_ENV: str(knowledge_dir)}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("CRYPTOGEN_LISTENING"), line
    proc.credentials_folder = folder
    return proc, LiveServer(int(line.rsplit(":", 1)[1]), folder / "server.pem", tokens, folder)


def stop_server(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    shutil.rmtree(getattr(proc, "credentials_folder", ""), ignore_errors=True)


@pytest.fixture()
def server(tiny_checkpoint):
    proc, live = start_server(tiny_checkpoint)
    yield proc, live
    stop_server(proc)
