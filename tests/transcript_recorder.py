"""Record every byte a cryptogen_hf party process receives (support for tests/test_security.py).

``install(folder)`` makes this process (and the session workers a server
forks after it) append to ``folder/transcript-<pid>.pkl`` every message its
framed ``Channel``s receive. The session's one connection carries everything,
so this is the whole of what the process receives:

- protocol messages: ``("channel", kind, payload bytes)``;
- CrypTen's messages (kind "mpc", mpc/channel_comm.py): ``("mpc", "mpc",
  numpy array)``, the payload read as int64 (uint8 if its length is not a
  multiple of 8).

Run as a program it is ``cryptogen serve`` with recording on (the folder is
the environment variable ``CRYPTOGEN_TEST_TRANSCRIPT``)::

    CRYPTOGEN_TEST_TRANSCRIPT=/tmp/t python tests/transcript_recorder.py serve --model PATH

Nothing here changes what is sent or computed: it only copies what arrives.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np

from cryptogen_hf.protocol import transport

ENV = "CRYPTOGEN_TEST_TRANSCRIPT"
_folder: Path | None = None


def _append(record) -> None:
    with open(_folder / f"transcript-{os.getpid()}.pkl", "ab") as f:
        pickle.dump(record, f)


def _record(kind: str, payload: bytes) -> None:
    if kind == transport.MPC_KIND:
        _append(("mpc", kind, np.frombuffer(payload, dtype=np.int64 if len(payload) % 8 == 0 else np.uint8).copy()))
    else:
        _append(("channel", kind, bytes(payload)))


def install(folder, channels=()) -> None:
    """Record from now on, on every channel made later and on ``channels``; idempotent."""
    global _folder
    _folder = Path(folder)
    _folder.mkdir(parents=True, exist_ok=True)
    for channel in channels:
        channel.recorder = _record
    if getattr(transport.Channel, "_records_transcript", False):
        return
    channel_init = transport.Channel.__init__

    def recording_init(self, *args, **kwargs):
        channel_init(self, *args, **kwargs)
        self.recorder = _record

    transport.Channel.__init__ = recording_init
    transport.Channel._records_transcript = True


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
