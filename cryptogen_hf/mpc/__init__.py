"""MPC half of CryptoGen: CrypTen secret sharing between the server and the
client for the non-linear ops (softmax, GELU, LayerNorm).

- :mod:`cryptogen_hf.mpc.runtime`: roles -> ranks, dealer modes, timeouts,
  ``init_party`` / ``run_dealer`` / ``shutdown`` / ``launch_local``.
- :mod:`cryptogen_hf.mpc.prg`: the AES-256-CTR generator behind every share,
  mask and correlation (CrypTen's own generators are replaced by it).
- :mod:`cryptogen_hf.mpc.two_party`: correlated randomness made by the two
  parties alone (the default, ``dealer="none"``): AND triples by OT
  extension (:mod:`cryptogen_hf.mpc.ot`), the rest with HE.
- :mod:`cryptogen_hf.mpc.ot`: IKNP random OT and the AND triples made from it.
- :mod:`cryptogen_hf.mpc.compare`: the sign of a shared value with few AND
  gates (every comparison).
- :mod:`cryptogen_hf.mpc.dealer`: the TTP dealer process's tuple provider and
  loop (CrypTen's TTP construction, two messages per tuple), for three-process
  benchmarks.
- :mod:`cryptogen_hf.mpc.ops`: accurate non-linear ops on CrypTen MPCTensors.
"""

from .runtime import (  # noqa: F401
    CLIENT,
    DEALER,
    SERVER,
    MPCConfig,
    MPCLaunchError,
    PeerError,
    init_party,
    launch_local,
    rank_of,
    role_of,
    run_dealer,
    shutdown,
)
