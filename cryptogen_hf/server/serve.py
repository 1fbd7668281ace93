"""The model-hosting server: ``cryptogen serve --model PATH``.

The server loads an ordinary HF checkpoint once, rearranges and quantises the
weights and encodes them as NTT plaintexts once, then listens. Each client
connection gets its own worker process (forked, so it shares the encoded
weights copy-on-write instead of re-encoding them): sessions are isolated, a
crash ends one session and not the server, and a worker's memory (keys,
encrypted cache) is returned to the OS when its session ends.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import CryptoGenConfig, load_config
from ..he import HEParams
from ..he.keys import PlaintextEncoder
from ..protocol import transport
from ..protocol.gpt2 import EncodedGPT2, GPT2Plans, ModelShape
from ..protocol.session import fixed_point_from, he_params_from, run_server_session
from .calibration import layer_norm_pre_scales
from .weights import check_supported, prepare_gpt2

log = logging.getLogger(__name__)


@dataclass
class HostedModel:
    """Everything a session worker needs; built once per server."""

    shape: ModelShape
    he_params: HEParams
    plans: GPT2Plans
    fixed_point: object
    encoded: EncodedGPT2


def load_hosted_model(model_path: str | Path, config: CryptoGenConfig, progress: bool = True) -> HostedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    hf_config = AutoConfig.from_pretrained(path)
    check_supported(hf_config)  # before loading weights: a clear error for other architectures
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None  # calibration falls back to random token ids
    prepared = prepare_gpt2(model)
    shape = ModelShape(
        n_layer=prepared.n_layer,
        n_embd=prepared.n_embd,
        n_head=prepared.n_head,
        n_positions=prepared.n_positions,
        vocab_size=prepared.vocab_size,
        ln_eps=float(hf_config.layer_norm_epsilon),
        ln_pre_scales=layer_norm_pre_scales(model, tokenizer, eps=float(hf_config.layer_norm_epsilon)),
        name=config.server.model_name,  # public shapes only, unless the operator names the model
    )
    he_params = he_params_from(config)
    plans = GPT2Plans(shape, he_params)
    fixed_point = fixed_point_from(config)
    bar = tqdm(total=2 + 4 * shape.n_layer, desc="encoding weights", unit="matrix", disable=not progress)
    encoded = EncodedGPT2(prepared, plans, PlaintextEncoder(he_params), fixed_point, progress=bar.update)
    bar.close()
    return HostedModel(shape, he_params, plans, fixed_point, encoded)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker if the server process dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: workers end when their client's connection drops


def _session_worker(listener: socket.socket, conn: socket.socket, hosted: HostedModel, config: CryptoGenConfig, host: str):
    listener.close()  # the worker serves one client; only the parent accepts
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    channel = transport.Channel(conn, "client", timeout_s=config.timeouts.peer_s)
    try:
        run_server_session(channel, hosted, config, host=host)
    except Exception as exc:  # noqa: BLE001 (one session's failure must not reach the server)
        log.warning("session ended with an error: %s: %s", type(exc).__name__, exc)
        try:
            channel.send("error", f"{type(exc).__name__}: {exc}".encode())
        except transport.TransportError:
            pass
        os._exit(1)
    finally:
        channel.close()
    os._exit(0)


def _refuse(conn: socket.socket, message: str) -> None:
    """Answer a connection the server will not serve with an error, from the
    parent process (no worker is started), and close it."""
    channel = transport.Channel(conn, "client", timeout_s=2.0)
    try:
        channel.send("error", message.encode())
        # Half-close and read what the client already sent (its hello), so the
        # close does not reset the connection before the error is read.
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        while conn.recv(1 << 16):
            pass
    except (transport.TransportError, OSError):
        pass
    finally:
        channel.close()
    log.warning("refused a client: %s", message)


def serve(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    config: CryptoGenConfig | str | None = None,
    ready=None,
    max_sessions: int | None = None,
    progress: bool = True,
) -> None:
    """Load the model and serve secure sessions until killed (or ``max_sessions`` have ended).

    ready: optional callable, called with the bound port once the server listens.
    """
    config = load_config(config)
    torch.set_num_threads(1)  # workers are forked: no OpenMP pool may be running
    hosted = load_hosted_model(model_path, config, progress=progress)
    listener = transport.listen(host, port)
    bound = listener.getsockname()[1]
    log.info("serving %s on %s:%d", model_path, host, bound)
    if config.mpc.dealer == "client":
        log.warning(
            "mpc.dealer is 'client': every client sees every activation of this model and can fit its "
            "weights from them; serve this way only a model whose weights are public"
        )
    if ready is not None:
        ready(bound)
    fork = multiprocessing.get_context("fork")
    workers: list[tuple[multiprocessing.Process, str]] = []  # (worker, the client's address)
    served = 0
    listener.settimeout(1.0)
    try:
        while max_sessions is None or served < max_sessions or workers:
            alive = []
            for w, client in workers:
                if w.is_alive():
                    alive.append((w, client))
                else:
                    w.join()  # reap: the session's memory is back with the OS
            workers = alive
            if max_sessions is not None and served >= max_sessions:
                if not workers:
                    break
                continue
            try:
                conn, (client, _) = listener.accept()
            except socket.timeout:
                continue
            limits = config.server
            theirs = sum(1 for _, c in workers if c == client)
            if len(workers) >= limits.max_concurrent_sessions:
                _refuse(conn, f"server busy: {len(workers)} sessions running (limit {limits.max_concurrent_sessions}); try again later")
                continue
            if theirs >= limits.max_sessions_per_client:
                _refuse(conn, f"too many sessions from {client}: {theirs} running (limit {limits.max_sessions_per_client})")
                continue
            worker = fork.Process(target=_session_worker, args=(listener, conn, hosted, config, host), daemon=True)
            worker.start()
            conn.close()  # the worker owns the connection now
            workers.append((worker, client))
            served += 1
    finally:
        listener.close()
        for w, _ in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()


def serve_in_child(model_path, config, ready_queue, host="127.0.0.1", port=0):
    """Entry point for a server started as a child process (local mode, tests)."""
    try:
        serve(model_path, host=host, port=port, config=config, ready=ready_queue.put, progress=False)
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which raises it)
        ready_queue.put(f"{type(exc).__name__}: {exc}")
        raise
