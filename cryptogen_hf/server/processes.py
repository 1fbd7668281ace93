"""What every process the server starts for a session does first."""

from __future__ import annotations

import signal


def die_with_parent() -> None:
    """Linux: have the kernel kill this process if the one that started it dies
    (a session worker when the server dies, an HE helper when its session's
    process dies), so none outlives a killed server holding the model's memory."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: workers end when their connection drops
