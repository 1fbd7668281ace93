"""Record everything a party process HOLDS during a session (support for tests/test_attacks.py).

``install(folder)`` makes this process (and the session workers a server
forks after it) append to ``folder/knowledge-<pid>.pkl``:

- ``("drawn", array)``: every random tensor this party draws for the MPC
  (CrypTen's two random-tensor helpers, wherever they are bound: its own
  shares of triples, zero-sharings, masks; a dealing client's whole triples);
- ``("tuple", kind, [arrays])``: this party's share of every correlated
  tuple its provider hands to CrypTen (triple, square, AND triple, B2A bit);
- ``("opened", op, array)``: every value opened to this party (the result of
  each all_reduce / reduce through CrypTen's communicator: Beaver's
  epsilon and delta, square masks, comparison openings, outputs).

and installs tests/transcript_recorder.py too (every byte received).
Nothing here changes what is sent or computed: it only copies.

Run as a program::

    CRYPTOGEN_TEST_KNOWLEDGE=/tmp/k python tests/knowledge_recorder.py serve --model PATH ...
    CRYPTOGEN_TEST_KNOWLEDGE=/tmp/k python tests/knowledge_recorder.py client PATH HOST:PORT CONFIG IDS N CERT TOKEN_FILE
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
from pathlib import Path

import torch

import transcript_recorder

ENV = "CRYPTOGEN_TEST_KNOWLEDGE"
_folder: Path | None = None
# Modules that bind CrypTen's random-tensor helpers by name (see crypten_compat).
_RNG_MODULES = (
    "crypten.common.rng",
    "crypten.mpc.primitives.arithmetic",
    "crypten.mpc.primitives.binary",
    "crypten.mpc.provider.ttp_provider",
    "crypten.mpc.provider.tfp_provider",
    "cryptogen_hf.mpc.two_party",
    "cryptogen_hf.mpc.dealer",
)
_TUPLE_METHODS = ("generate_additive_triple", "square", "generate_binary_triple", "B2A_rng")


def _append(record) -> None:
    with open(_folder / f"knowledge-{os.getpid()}.pkl", "ab") as f:
        pickle.dump(record, f)


def _array(t):
    t = getattr(t, "share", t)
    return t.detach().cpu().numpy().copy()


def _wrap_rng(module, name):
    original = getattr(module, name)
    if getattr(original, "_records_knowledge", False):
        return

    def drawing(*args, **kwargs):
        out = original(*args, **kwargs)
        _append(("drawn", _array(out)))
        return out

    drawing._records_knowledge = True
    setattr(module, name, drawing)


class _RecordingProvider:
    """Proxy of the session's tuple provider that records the tuples it hands out."""

    def __init__(self, provider):
        self._provider = provider

    def __getattr__(self, name):
        attr = getattr(self._provider, name)
        if name not in _TUPLE_METHODS:
            return attr

        def recording(*args, **kwargs):
            out = attr(*args, **kwargs)
            _append(("tuple", name, [_array(t) for t in out]))
            return out

        return recording


def _recording_opening(original, name):
    def opening(*args, **kwargs):
        out = original(*args, **kwargs)
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if t is not None:
                _append(("opened", name, _array(t)))
        return out

    return opening


def install_in_session(folder) -> None:
    """The same, from inside a session that has already started (launch_local programs):
    the live communicator's openings, the provider's tuples and every later draw."""
    global _folder
    _folder = Path(folder)
    _folder.mkdir(parents=True, exist_ok=True)
    _install_draws_and_tuples()
    import crypten.communicator as comm

    communicator = comm.get()
    for name in ("all_reduce", "reduce"):
        setattr(communicator, name, _recording_opening(getattr(communicator, name), name))


def install(folder) -> None:
    global _folder
    _folder = Path(folder)
    _folder.mkdir(parents=True, exist_ok=True)
    transcript_recorder.install(folder)
    _install_draws_and_tuples()
    from cryptogen_hf.mpc.channel_comm import ChannelCommunicator as communicator

    for name in ("all_reduce", "reduce"):  # a plain function: it binds as a method
        setattr(communicator, name, _recording_opening(getattr(communicator, name), name))


def _install_draws_and_tuples() -> None:
    from cryptogen_hf.crypten_compat import import_crypten

    crypten = import_crypten()
    if getattr(crypten.mpc, "_records_knowledge", False):
        return
    for module_name in _RNG_MODULES:
        module = importlib.import_module(module_name)
        for name in ("generate_random_ring_element", "generate_kbit_random_tensor"):
            if hasattr(module, name):
                _wrap_rng(module, name)

    get_default_provider = crypten.mpc.get_default_provider
    crypten.mpc.get_default_provider = lambda: _RecordingProvider(get_default_provider())
    crypten.mpc._records_knowledge = True


def load(folder, pid) -> dict:
    """{"drawn": [...], "tuple": [(kind, [...])], "opened": [...]} for one process."""
    out = {"drawn": [], "tuple": [], "opened": []}
    with open(Path(folder) / f"knowledge-{pid}.pkl", "rb") as f:
        while True:
            try:
                record = pickle.load(f)
            except EOFError:
                return out
            if record[0] == "drawn":
                out["drawn"].append(record[1])
            elif record[0] == "tuple":
                out["tuple"].append((record[1], record[2]))
            else:
                out["opened"].append(record[2])


def _client(model_path, server, config_path, ids, new_tokens, server_cert, token_file) -> None:
    from cryptogen_hf.config import load_config
    from cryptogen_hf.hf.modeling import CryptoGenForCausalLM
    from cryptogen_hf.protocol.credentials import read_token

    model = CryptoGenForCausalLM.from_pretrained(model_path, server=server, server_cert=server_cert,
                                                 server_token=read_token(None, token_file), settings=load_config(config_path))
    try:
        out = model.generate(torch.tensor([json.loads(ids)]), max_new_tokens=int(new_tokens), do_sample=False)
    finally:
        model.close()
    print(json.dumps({"pid": os.getpid(), "tokens": out[0].tolist()}), flush=True)


if __name__ == "__main__":
    install(os.environ[ENV])
    if sys.argv[1] == "client":
        _client(*sys.argv[2:])
    else:
        from cryptogen_hf.cli import main

        sys.exit(main(sys.argv[1:]))
