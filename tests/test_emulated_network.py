"""The emulated network that `cryptogen bench --net` runs the two parties over.

What the benchmark's figures rest on: each condition is what it says (the
round trip is at least the one set, the rate at most the one set), the link
can be switched while connections stay open, and nothing is left behind.
The session over it is tested in tests/test_cli.py (`bench --net`).
"""

import subprocess

from cryptogen_hf.emulated_network import NETWORKS, EmulatedLink


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_each_condition_is_what_it_says_and_nothing_is_left_behind():
    with EmulatedLink() as link:
        assert link.namespace in namespaces()
        figures = {name: link.set(network) for name, network in NETWORKS.items()}
        back = link.set(NETWORKS["loopback"])  # and back again, on the same relay and echo connection set-up
    assert link.namespace not in namespaces()  # the namespace and its veth pair are gone

    # The round trips at least what was set (within 10 %: the relay's own share, measured
    # once at the start, is taken off its delay) and the rates at most: bounds that a
    # loaded machine only pushes further into.
    for name in ("lan", "wan"):
        assert figures[name]["rtt_ms"] >= 0.9 * NETWORKS[name].rtt_ms, figures
        assert figures[name]["mbit_per_s"] <= 1.05 * NETWORKS[name].rate_mbit, figures
    # Control: unshaped, the same link is far quicker, so the bounds above are the emulation's doing.
    for unshaped in (figures["loopback"], back):
        assert unshaped["rtt_ms"] < NETWORKS["wan"].rtt_ms / 4
        assert unshaped["mbit_per_s"] > NETWORKS["wan"].rate_mbit * 2
