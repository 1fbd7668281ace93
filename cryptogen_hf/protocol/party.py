"""What one party of a session holds while the protocol runs."""

from __future__ import annotations

from dataclasses import dataclass

from ..mpc.runtime import CLIENT, PARTY_ROLES, SERVER
from .transport import Channel

__all__ = ["Party", "SERVER", "CLIENT"]


@dataclass
class Party:
    """This process's side of a two-party session.

    role: "server" (holds the weights and the encrypted cache) or "client"
        (holds the prompt, the tokens and the HE secret key).
    channel: the framed connection to the other party (ciphertexts, masked values).
    he: the HE side of this role: ``ClientHE`` (can decrypt) at the client,
        ``ServerHE`` (public material only) at the server.
    CrypTen's own communicator (initialised by ``cryptogen_hf.mpc.runtime``)
    carries the secret-share arithmetic beside the channel.
    """

    role: str
    channel: Channel
    he: object

    def __post_init__(self):
        if self.role not in PARTY_ROLES:
            raise ValueError(f"role must be one of {PARTY_ROLES}, got {self.role!r}")

    @property
    def is_server(self) -> bool:
        return self.role == SERVER

    @property
    def is_client(self) -> bool:
        return self.role == CLIENT
