"""MPC half of CryptoGen: CrypTen secret sharing between the server and the
client for the non-linear ops (softmax, GELU, LayerNorm).

- :mod:`cryptogen_hf.mpc.runtime`: roles -> ranks, dealer modes, timeouts,
  ``init_party`` / ``run_dealer`` / ``shutdown`` / ``launch_local``.
- :mod:`cryptogen_hf.mpc.dealer`: the TTP dealer process's tuple provider and
  loop (CrypTen's TTP construction, two messages per tuple).
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
