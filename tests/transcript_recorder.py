"""Record every byte a cryptogen_hf party process receives (support for tests/test_security.py).

``install(folder)`` makes this process (and the session workers a server
forks after it) append to ``folder/transcript-<pid>.pkl``:

- every message its framed ``Channel``s receive: ``("channel", kind, payload bytes)``;
- every tensor torch.distributed writes into a buffer of this process during a
  receive or a collective (CrypTen's whole MPC traffic goes through these):
  ``("mpc", function name, numpy array)``. Buffers are recorded as gloo left
  them, so a collective that hands this process more than its own result
  (as gloo's ``reduce`` does to the ranks that are not the root) shows up.

Run as a program it is ``cryptogen serve`` with recording on (the folder is
the environment variable ``CRYPTOGEN_TEST_TRANSCRIPT``)::

    CRYPTOGEN_TEST_TRANSCRIPT=/tmp/t python tests/transcript_recorder.py serve --model PATH

Nothing here changes what is sent or computed: it only copies what arrives.
"""

from __future__ import annotations

import inspect
import os
import pickle
import sys
from pathlib import Path

import torch.distributed as dist

from cryptogen_hf.protocol import transport

ENV = "CRYPTOGEN_TEST_TRANSCRIPT"
_folder: Path | None = None


def _append(record) -> None:
    with open(_folder / f"transcript-{os.getpid()}.pkl", "ab") as f:
        pickle.dump(record, f)


def _record_tensors(name: str, tensors) -> None:
    for t in tensors:
        _append(("mpc", name, t.detach().cpu().numpy().copy()))


class _RecordOnWait:
    """An async Work whose buffers are recorded once it completes."""

    def __init__(self, work, record):
        self._work, self._record = work, record

    def wait(self, *args, **kwargs):
        done = self._work.wait(*args, **kwargs)
        self._record()
        return done

    def __getattr__(self, name):
        return getattr(self._work, name)


def _not_from_me(root_key):
    """Buffer of a rooted collective: received only where this rank is not the root."""
    return lambda a: [a["tensor"]] if a.get(root_key) != dist.get_rank() else []


# function -> the buffers it fills in this process, from its bound arguments
_RECEIVING = {
    "recv": lambda a: [a["tensor"]],
    "irecv": lambda a: [a["tensor"]],
    "all_reduce": lambda a: [a["tensor"]],
    "reduce": lambda a: [a["tensor"]],  # every rank: gloo may write the result into non-roots too
    "broadcast": _not_from_me("src"),
    "scatter": _not_from_me("src"),
    "all_gather": lambda a: list(a["tensor_list"]),
    "gather": lambda a: list(a.get("gather_list") or []),
}


def _wrap(name: str, buffers_of):
    original = getattr(dist, name)
    signature = inspect.signature(original)

    def recording(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        result = original(*args, **kwargs)
        record = lambda: _record_tensors(name, buffers_of(bound))  # noqa: E731
        if name == "irecv" or bound.get("async_op"):
            return _RecordOnWait(result, record) if result is not None else None
        record()
        return result

    recording.__wrapped__ = original
    setattr(dist, name, recording)


def install(folder) -> None:
    """Record from now on; idempotent."""
    global _folder
    _folder = Path(folder)
    _folder.mkdir(parents=True, exist_ok=True)
    if getattr(transport.Channel, "_records_transcript", False):
        return
    channel_init = transport.Channel.__init__

    def recording_init(self, *args, **kwargs):
        channel_init(self, *args, **kwargs)
        self.recorder = lambda kind, payload: _append(("channel", kind, bytes(payload)))

    transport.Channel.__init__ = recording_init
    transport.Channel._records_transcript = True
    for name, buffers_of in _RECEIVING.items():
        _wrap(name, buffers_of)


def load(path) -> list:
    """The records of one transcript file, in order of arrival."""
    records = []
    with open(path, "rb") as f:
        while True:
            try:
                records.append(pickle.load(f))
            except EOFError:
                return records


if __name__ == "__main__":
    install(os.environ[ENV])
    from cryptogen_hf.cli import main

    sys.exit(main(sys.argv[1:]))
