"""Tensor-parallel HE for one session: the server's HE work over several processes.

SEAL (``tenseal.sealapi``) holds the GIL, so one process computes on one
core. A session of a server with ``server.he_workers = n`` forks n - 1 helper
processes as soon as the client's HE keys have arrived (before any MPC state
or thread exists); the session's own process is worker 0 and does a share of
every split product itself.

What is split, and how (each result is added up exactly, so the ciphertexts
are bit for bit those of one process):
- plaintext-weight products whose weights were encoded at load: every
  decode-plan and verify-plan linear layer, the LM head and the token
  embedding. ``MatvecWork`` lists their (input, output tile, giant step)
  items; worker w sums the w-th contiguous run of them, and the unfolded
  partial sums come back here to be added and folded. A packed prompt pass
  encodes its weights as it goes, and each worker would encode them all: it
  runs here alone.
- attention over the inner cache: block i of every layer belongs to worker
  i mod n. q·Kᵀ of a block runs on its owner; p·V partial sums (one per
  owner and query row) are added here.

What each helper holds:
- the encoded weights, inherited at the fork from the server process that
  encoded them at load: shared copy-on-write and never written, so they are
  in memory once however many workers run (``memory_kib`` reports each
  helper's proportional share);
- the client's public HE keys (the server never has the secret key);
- a copy of the cache blocks it owns. The session's process keeps the whole
  cache (refresh, crop and the benchmarks' fill work on it unchanged) and
  sends a helper a block again whenever the block changed since it last did
  (``InnerKVCache.versions``): one block per layer and decode step.

Privacy: a helper is the server. It receives what the session's process
holds already (ciphertexts under the client's key, the server's weights) and
sends nothing to the client; every result still leaves through the session
process's re-randomisation and flooding (``ServerHE.mask_for_client``).

Wire: a Unix socketpair per helper; a message is an 8-byte length, then a
JSON header and serialized ciphertexts (``wire.pack_blobs``). Every receive
has the session's peer timeout; a helper that dies or stops answering fails
the session with an error that names it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import time

from ..he import InnerKVCache, OuterAttentionPlan, OuterKVCache
from ..he.diagonal import DEFAULT_COSTS
from ..he.matvec import MatvecWork
from ..protocol.wire import pack_blobs, unpack_blobs
from .processes import die_with_parent


class HEWorkerError(RuntimeError):
    """A helper process died, stopped answering or failed a job."""


# -- which product -----------------------------------------------------------
def pre_encoded_product(encoded, plans, key: tuple, n_cts: int) -> tuple[MatvecWork, list]:
    """The work and weight sets of a product whose weights were encoded at load.

    key: ("embed",), ("lm_head",) or ("linear", layer, name, "decode" | "verify").
    The session's process and its helpers build the same work from it.
    """
    if key[0] == "embed":
        if n_cts % plans.embed_chunks:
            raise ValueError(f"{n_cts} embedding ciphertexts do not split into {plans.embed_chunks} chunks")
        return MatvecWork.for_embedding(plans.embed, plans.embed_chunks, n_cts // plans.embed_chunks), encoded.embed
    if key[0] == "lm_head":
        enc = encoded.lm_head
        plan, weights = enc.plan, enc.weights
    elif key[0] == "linear":
        _, layer, name, which = key
        enc = encoded.blocks[layer][name]
        plan, weights = (enc.plan, enc.weights) if which == "decode" else (enc.verify_plan, enc.verify_weights)
    else:
        raise ValueError(f"unknown product {key!r}")
    weight_sets = weights if plan.n_inputs > 1 else [weights]  # SplitMatvecPlan: a set per part
    return MatvecWork.for_pass(plan, n_cts), weight_sets


def _owned_blocks(worker: int, n_workers: int, n_blocks: int) -> range:
    return range(worker, n_blocks, n_workers)


# -- the wire between the session's process and a helper -----------------------
def _send(sock: socket.socket, header: dict, blobs: list[bytes]) -> None:
    head = json.dumps(header).encode()
    body = struct.pack("<I", len(head)) + head + pack_blobs(blobs)
    sock.sendall(struct.pack("<Q", len(body)) + body)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None, who: str) -> bytes:
    parts, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([sock], [], [], wait)[0]:
                raise HEWorkerError(f"{who} did not answer in time")
        part = sock.recv(min(left, 1 << 22))
        if not part:
            raise HEWorkerError(f"{who} stopped (its connection closed)")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _recv(sock: socket.socket, timeout_s: float | None, who: str) -> tuple[dict, list[bytes]]:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    (length,) = struct.unpack("<Q", _recv_exact(sock, 8, deadline, who))
    body = _recv_exact(sock, length, deadline, who)
    (head_len,) = struct.unpack_from("<I", body, 0)
    header = json.loads(body[4 : 4 + head_len])
    if "error" in header:
        raise HEWorkerError(f"{who} failed: {header['error']}")
    return header, unpack_blobs(body[4 + head_len :])


# -- the session's side ----------------------------------------------------------
class HEWorkers:
    """The HE work of one session, over this process (worker 0) and n - 1 helpers.

    Each split product sends every helper its request, computes this
    process's share, then reads the helpers' replies in turn. Any error
    (a helper's, or a timeout) ends the session: replies still in flight
    would otherwise answer the next request.

    With n = 1 every method is the plain one-process computation. A product
    is split only when the planners' estimate of its one-process time
    (he/diagonal.py's DEFAULT_COSTS) is at least ``min_split_seconds``
    (``server.he_split_min_seconds``, 0.15 s by default). Measured on 2
    cores, one session on loopback: GPT-2-base's products (estimates
    0.17-4 s) ran 1.4-1.75x faster in two processes; the shipped model's
    linear layers (estimates 0.05-0.09 s, 50-70 ms measured) ran slower, the
    serialization and the baby steps both processes repeat outweighing the
    halved products.
    """

    def __init__(self, he, encoded, plans, n_workers: int, timeout_s: float, idle_timeout_s: float | None = None,
                 min_split_seconds: float = 0.15):
        if n_workers < 1:
            raise ValueError(f"he_workers must be >= 1, got {n_workers}")
        self.he, self.encoded, self.plans = he, encoded, plans
        self.n, self.timeout_s, self.min_split_seconds = n_workers, timeout_s, min_split_seconds
        self.helpers: list[tuple[int, socket.socket]] = []  # (pid, socket) of workers 1..n-1
        # (worker, layer, block index or "outer") -> the version of it that worker holds
        self._sent: dict[tuple, int] = {}
        for worker in range(1, n_workers):
            mine, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the helper
                mine.close()
                for _, earlier in self.helpers:  # else an earlier helper would never see its connection close
                    earlier.close()
                _helper_main(theirs, worker, n_workers, he, encoded, plans, idle_timeout_s)
            theirs.close()
            mine.settimeout(timeout_s)  # a send to a helper that stopped reading fails too
            self.helpers.append((pid, mine))

    def close(self) -> None:
        """End the helpers: each exits when its connection closes (killed if it has not within 5 s)."""
        for _, sock in self.helpers:
            sock.close()
        deadline = time.monotonic() + 5.0
        for pid, _ in self.helpers:
            try:
                while os.waitpid(pid, os.WNOHANG) == (0, 0):
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        break
                    time.sleep(0.01)
            except ChildProcessError:
                pass
        self.helpers = []

    def _gather(self, what: str) -> list[tuple[dict, list[bytes]]]:
        return [_recv(sock, self.timeout_s, f"HE worker {w} ({what})") for w, (_, sock) in enumerate(self.helpers, 1)]

    def _send_to(self, worker: int, header: dict, blobs: list[bytes], what: str) -> None:
        try:
            _send(self.helpers[worker - 1][1], header, blobs)
        except socket.timeout:
            raise HEWorkerError(f"HE worker {worker} ({what}) did not answer in time") from None
        except OSError as exc:
            raise HEWorkerError(f"HE worker {worker} ({what}) stopped: {exc}") from None

    # -- plaintext-weight products
    def matvec(self, key: tuple, cts: list) -> list:
        """The pre-encoded product ``key`` (see ``pre_encoded_product``) of a pass's input ciphertexts."""
        he = self.he
        work, weight_sets = pre_encoded_product(self.encoded, self.plans, key, len(cts))
        if self.n == 1 or work.plan.est_seconds * len(work.terms) < self.min_split_seconds:
            return work.run(he, weight_sets, cts)
        blobs = {}  # input index -> its bytes, serialized once for all helpers
        for worker in range(1, self.n):
            inputs = work.inputs_of(work.shard(worker, self.n))
            for i in inputs:
                if i not in blobs:
                    blobs[i] = he.serialize_ct(cts[i])
            header = {"op": "matvec", "key": list(key), "n_cts": len(cts), "inputs": inputs}
            self._send_to(worker, header, [blobs[i] for i in inputs], "matvec")
        partials = [work.partial_sums(he, weight_sets, dict(enumerate(cts)), work.shard(0, self.n))]
        for header, reply in self._gather("matvec"):
            partials.append({tuple(k): he.load_ct(b) for k, b in zip(header["keys"], reply)})
        return work.combine(he, partials)

    # -- attention over the inner cache
    def _updates_for(self, worker: int, layer: int, cache: InnerKVCache) -> tuple[dict, list[bytes]]:
        """The blocks of ``worker`` that changed since it last got them (K and V each)."""
        n_blocks = len(cache.k_cts)
        stale = [i for i in _owned_blocks(worker, self.n, n_blocks) if self._sent.get((worker, layer, i)) != cache.versions[i]]
        blobs = []
        for i in stale:
            blobs += [self.he.serialize_ct(cache.k_cts[i]), self.he.serialize_ct(cache.v_cts[i])]
            self._sent[(worker, layer, i)] = cache.versions[i]
        return {"layer": layer, "n_blocks": n_blocks, "updates": stale}, blobs

    def _split_attention(self, n_products: int) -> bool:
        per_product = DEFAULT_COSTS["mul_ct"] + DEFAULT_COSTS["relin"]
        return self.n > 1 and n_products * per_product >= self.min_split_seconds

    def scores(self, layer: int, cache: InnerKVCache, q_cts: list) -> list[list]:
        """q·Kᵀ for each query ciphertext: one output ciphertext per block, in block order."""
        he, n_blocks = self.he, len(cache.k_cts)
        if not self._split_attention(n_blocks * len(q_cts)):
            return [cache.scores(he, q) for q in q_cts]
        q_blobs = [he.serialize_ct(q) for q in q_cts]
        for worker in range(1, self.n):
            header, blobs = self._updates_for(worker, layer, cache)
            self._send_to(worker, {"op": "scores", "n_queries": len(q_cts), **header}, q_blobs + blobs, "scores")
        out = [[None] * n_blocks for _ in q_cts]
        own = _owned_blocks(0, self.n, n_blocks)
        for q, q_ct in enumerate(q_cts):
            for i, ct in zip(own, cache.scores(he, q_ct, own)):
                out[q][i] = ct
        for worker, (_, reply) in enumerate(self._gather("scores"), 1):
            theirs = _owned_blocks(worker, self.n, n_blocks)
            for j, blob in enumerate(reply):
                out[j // len(theirs)][theirs[j % len(theirs)]] = he.load_ct(blob)
        return out

    def attend(self, layer: int, cache: InnerKVCache, rows: list[list]) -> list:
        """p·V for each query row (its probabilities, one ciphertext per block) -> one ciphertext per row."""
        he = self.he
        n_blocks = min(len(cache.v_cts), min(len(row) for row in rows))
        if not self._split_attention(n_blocks * len(rows)):
            return [cache.attend(he, row) for row in rows]
        for worker in range(1, self.n):
            header, blobs = self._updates_for(worker, layer, cache)
            theirs = _owned_blocks(worker, self.n, n_blocks)
            probs = [he.serialize_ct(row[i]) for row in rows for i in theirs]
            self._send_to(worker, {"op": "attend", "n_rows": len(rows), "n_used": n_blocks, **header}, probs + blobs, "attend")
        own = _owned_blocks(0, self.n, n_blocks)
        partials = [[cache.attend_partial(he, [row[i] for i in own], own)] for row in rows]
        for header, reply in self._gather("attend"):
            for r, blob in zip(header["rows"], reply):
                partials[r].append(he.load_ct(blob))
        return [cache.attend_finish(he, row_partials) for row_partials in partials]

    # -- attention over the outer part (a long prompt's keys and values as diagonals)
    def _outer_giants(self, worker: int, lay) -> range:
        return range(worker * lay.n2 // self.n, (worker + 1) * lay.n2 // self.n)

    def _outer_updates_for(self, worker: int, layer: int, cache: OuterKVCache) -> tuple[dict, list[bytes]]:
        """The diagonals of ``worker``'s giant steps, both products, unless it holds them already."""
        if self._sent.get((worker, layer, "outer")) == cache.version:
            return {"layer": layer, "outer": None}, []
        plan, places, blobs = cache.plan, [], []
        for which in ("scores", "attend"):
            diagonals = plan.diagonals(cache, which)
            for g in self._outer_giants(worker, plan.layout(which)):
                for b, ct in enumerate(diagonals[g]):
                    if ct is not None:
                        places.append([which, g, b])
                        blobs.append(self.he.serialize_ct(ct))
        self._sent[(worker, layer, "outer")] = cache.version
        n1 = plan.scores_layout.n1
        return {"layer": layer, "outer": {"tokens": plan.T, "n1": n1, "places": places}}, blobs

    def _split_outer(self, cache: OuterKVCache, which: str, n_inputs: int) -> bool:
        diagonals = cache.plan.diagonals(cache, which)
        return self._split_attention(n_inputs * sum(ct is not None for row in diagonals for ct in row))

    def place_outer(self, layer: int, cache: OuterKVCache) -> None:
        """Give each helper its diagonals of a new outer part now (a prompt's
        pass), so that the first decode step does not wait for them."""
        if not self._split_outer(cache, "scores", 1):
            return
        for worker in range(1, self.n):
            header, blobs = self._outer_updates_for(worker, layer, cache)
            self._send_to(worker, {"op": "outer_store", **header}, blobs, "outer_store")
        self._gather("outer_store")

    def outer(self, layer: int, cache: OuterKVCache, which: str, cts: list) -> list:
        """``which`` ("scores": q·Kᵀ, "attend": p·V) against the outer part, one output per input ciphertext."""
        he, plan = self.he, cache.plan
        if not self._split_outer(cache, which, len(cts)):
            return [plan.finish(he, which, [plan.partial(he, cache, which, ct)]) for ct in cts]
        inputs = [he.serialize_ct(ct) for ct in cts]
        for worker in range(1, self.n):
            header, blobs = self._outer_updates_for(worker, layer, cache)
            self._send_to(worker, {"op": "outer", "which": which, "n_inputs": len(cts), **header}, inputs + blobs, "outer")
        own = self._outer_giants(0, plan.layout(which))
        partials = [[plan.partial(he, cache, which, ct, own)] for ct in cts]
        for header, reply in self._gather("outer"):
            for i, blob in zip(header["present"], reply):
                partials[i].append(he.load_ct(blob))
        return [plan.finish(he, which, row) for row in partials]

    def memory_kib(self) -> list[dict]:
        """Each helper's memory, KiB: "pss", its proportional set size (a page
        shared by k processes counts 1/k), and "private", the pages it alone
        holds (what it adds to the machine's use: the weights it shares
        with the session's process are not among them)."""
        return [_smaps_rollup_kib(pid) for pid, _ in self.helpers]


def _smaps_rollup_kib(pid: int) -> dict:
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("Pss", "Private_Clean", "Private_Dirty"):
                    fields[name] = int(rest.split()[0])
    except OSError:
        pass
    return {"pss": fields.get("Pss", 0), "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


# -- a helper ------------------------------------------------------------------------
def _helper_main(sock, worker: int, n_workers: int, he, encoded, plans, idle_timeout_s: float | None) -> None:
    """Serve the session's process until it closes the connection (or is
    silent for ``idle_timeout_s``, the session's own idle limit); never returns."""
    die_with_parent()
    status = 0
    # What this helper holds of the cache, per layer: its inner blocks (others
    # None) and its giant steps' diagonals of the outer part (others None).
    replicas: dict[str, dict] = {"inner": {}, "outer": {}}
    try:
        while True:
            try:
                header, blobs = _recv(sock, idle_timeout_s, "the session's process")
            except HEWorkerError:
                break  # the session ended
            try:
                reply = _helper_job(header, blobs, worker, n_workers, he, encoded, plans, replicas)
            except Exception as exc:  # noqa: BLE001 (reported to the session's process, which fails the session)
                _send(sock, {"error": f"{type(exc).__name__}: {exc}"}, [])
                continue
            _send(sock, *reply)
    except BaseException:  # noqa: BLE001 (a helper never unwinds into the session's code)
        status = 1
    finally:
        os._exit(status)


def _helper_job(header, blobs, worker, n_workers, he, encoded, plans, replicas) -> tuple[dict, list[bytes]]:
    """One request of the session's process -> the reply (header, ciphertexts)."""
    op = header["op"]
    if op == "matvec":
        work, weight_sets = pre_encoded_product(encoded, plans, tuple(header["key"]), header["n_cts"])
        cts = {i: he.load_ct(b) for i, b in zip(header["inputs"], blobs)}
        sums = work.partial_sums(he, weight_sets, cts, work.shard(worker, n_workers))
        return {"keys": [list(k) for k in sums]}, [he.serialize_ct(ct) for ct in sums.values()]
    if op in ("scores", "attend"):
        return _helper_inner(header, blobs, worker, n_workers, he, plans, replicas["inner"])
    if op in ("outer", "outer_store"):
        return _helper_outer(header, blobs, he, plans, replicas["outer"])
    raise ValueError(f"unknown job {op!r}")


def _helper_inner(header, blobs, worker, n_workers, he, plans, replicas) -> tuple[dict, list[bytes]]:
    """A helper's part of a product against the inner cache: the blocks it owns."""
    op, layer, n_blocks = header["op"], header["layer"], header["n_blocks"]
    n_own_inputs = header["n_queries"] if op == "scores" else header["n_rows"] * len(_owned_blocks(worker, n_workers, header["n_used"]))
    inputs, updates = blobs[:n_own_inputs], blobs[n_own_inputs:]
    layout = plans.cache_layout
    cache = replicas.setdefault(layer, InnerKVCache(layout.H, layout.dh, he.params))
    del cache.k_cts[n_blocks:], cache.v_cts[n_blocks:]
    cache.k_cts += [None] * (n_blocks - len(cache.k_cts))
    cache.v_cts += [None] * (n_blocks - len(cache.v_cts))
    for j, i in enumerate(header["updates"]):
        cache.k_cts[i], cache.v_cts[i] = he.load_ct(updates[2 * j]), he.load_ct(updates[2 * j + 1])
    if op == "scores":
        own = _owned_blocks(worker, n_workers, n_blocks)
        outs = [ct for blob in inputs for ct in cache.scores(he, he.load_ct(blob), own)]
        return {}, [he.serialize_ct(ct) for ct in outs]
    own = _owned_blocks(worker, n_workers, header["n_used"])
    rows, replies = [], []
    for r in range(header["n_rows"]):
        probs = [he.load_ct(b) for b in inputs[r * len(own) : (r + 1) * len(own)]]
        partial = cache.attend_partial(he, probs, own)
        if partial is not None:
            rows.append(r)
            replies.append(he.serialize_ct(partial))
    return {"rows": rows}, replies


def _helper_outer(header, blobs, he, plans, replicas) -> tuple[dict, list[bytes]]:
    """A helper's part of a product against the outer cache: its giant steps' diagonals."""
    layer, update = header["layer"], header["outer"]
    n_inputs = header.get("n_inputs", 0)
    if update is not None:  # a new outer part: this helper's diagonals of it
        layout = plans.cache_layout
        plan = OuterAttentionPlan(layout.H, layout.dh, update["tokens"], he.params, update["n1"])
        empty = {which: [[None] * plan.layout(which).n1 for _ in range(plan.layout(which).n2)] for which in ("scores", "attend")}
        for (which, g, b), blob in zip(update["places"], blobs[n_inputs:]):
            empty[which][g][b] = he.load_ct(blob)
        replicas[layer] = OuterKVCache(plan, empty["scores"], empty["attend"], fresh_budget=0.0)
    if header["op"] == "outer_store":
        return {}, []
    cache, which = replicas[layer], header["which"]
    giants = [g for g, row in enumerate(cache.plan.diagonals(cache, which)) if any(ct is not None for ct in row)]  # this helper's
    present, replies = [], []
    for i, blob in enumerate(blobs[:n_inputs]):
        partial = cache.plan.partial(he, cache, which, he.load_ct(blob), giants)
        if partial is not None:
            present.append(i)
            replies.append(he.serialize_ct(partial))
    return {"present": present}, replies
