"""The model-hosting server: ``cryptogen serve --model PATH``.

The server loads an ordinary HF checkpoint once, rearranges and quantises the
weights and encodes them as NTT plaintexts once, then listens on one port.
For each connection the accepting process runs the TLS handshake and checks
the client's token (``auth`` -> ``auth.ok``), then the session limits; only
then does the client get its own worker process (forked, so it shares the
encoded weights copy-on-write instead of re-encoding them). Sessions are
isolated, a crash ends one session and not the server, and a worker's memory
(keys, encrypted cache) is returned to the OS when its session ends. The
worker carries on over the same TLS connection: requests, ciphertexts and
CrypTen's traffic (nothing else listens).
"""

from __future__ import annotations

import dataclasses
import json
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
from ..he.keys import PlaintextEncoder, bundle_size_limit, ciphertext_size_limit
from ..protocol import credentials, transport
from ..families import ModelShape, family_for_config
from ..protocol.decoder import DecoderPlans, EncodedDecoder
from ..protocol.session import fixed_point_from, he_params_from, run_server_session
from .calibration import norm_pre_scales
from .processes import die_with_parent

log = logging.getLogger(__name__)


@dataclass
class HostedModel:
    """Everything a session worker needs; built once per server."""

    shape: ModelShape
    he_params: HEParams
    plans: DecoderPlans
    fixed_point: object
    encoded: EncodedDecoder
    # Public decoding metadata for the handshake: special token ids and the
    # checkpoint's generation defaults (generation_config.json).
    generation: dict


def load_hosted_model(model_path: str | Path, config: CryptoGenConfig, progress: bool = True) -> HostedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    hf_config = AutoConfig.from_pretrained(path)
    wiring = family_for_config(hf_config, he_params_from(config).row_size)  # before loading weights: a clear error for other architectures
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None  # calibration falls back to random token ids
    prepared = wiring.prepare(model)
    shape = dataclasses.replace(
        prepared.shape,
        norm_pre_scales=norm_pre_scales(model, wiring, prepared.shape, tokenizer),
        name=config.server.model_name,  # public shapes only, unless the operator names the model
    )
    he_params = he_params_from(config)
    plans = DecoderPlans(shape, he_params)
    fixed_point = fixed_point_from(config)
    bar = tqdm(total=EncodedDecoder.n_matrices(shape), desc="encoding weights", unit="matrix", disable=not progress)
    encoded = EncodedDecoder(prepared, plans, PlaintextEncoder(he_params), fixed_point, progress=bar.update)
    bar.close()
    return HostedModel(shape, he_params, plans, fixed_point, encoded, generation_metadata(path))


# Generation defaults a client may take from the server: the decoding options
# of generation_config.json that are plain numbers, flags or token ids
# (nothing else about the checkpoint goes into the handshake).
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_k", "top_p",
                   "repetition_penalty", "max_new_tokens", "max_length", "no_repeat_ngram_size", "bad_words_ids")


def generation_metadata(path: Path) -> dict:
    """The checkpoint's generation defaults as HF loads them (generation_config.json,
    else derived from config.json), restricted to GENERATION_KEYS."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
    values = generation.to_diff_dict()

    def plain(value) -> bool:  # a number, a flag, or (nested) lists of token ids
        if isinstance(value, list):
            return all(isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v)) for v in value)
        return isinstance(value, (int, float, bool))

    return {k: values[k] for k in GENERATION_KEYS if k in values and plain(values[k])}


# A session worker's memory beyond the shared, encoded weights: its HE keys,
# its encrypted cache, and this much for the interpreter, SEAL and torch
# working sets and the correlation pools (a shipped-model worker measures
# ~0.66 GB RSS, most of it pages shared with the accepting process).
WORKER_BASE_BYTES = 512 << 20
# An HE helper's memory of its own (server/he_workers.py; the weights and keys
# it shares with its session's worker are not in it), beside its copy of its
# share of the cache: a GPT-2-base helper at context 512 measured 471 MB,
# about 290 MB of them its half of the cache.
HELPER_BASE_BYTES = 256 << 20


def session_memory_estimate(hosted: HostedModel, he_workers: int = 1) -> int:
    """Bytes one more session may take at most: its key bundle, a full
    encrypted cache (every layer's K and V for n_positions tokens, in the
    larger of the two layouts), WORKER_BASE_BYTES, and for each of its
    he_workers - 1 HE helpers HELPER_BASE_BYTES and its share of the cache."""
    from ..protocol.session import cache_ciphertexts_bound

    params, shape = hosted.he_params, hosted.shape
    n_steps = len(hosted.plans.galois_steps())
    cache_bytes = cache_ciphertexts_bound(hosted.plans, shape, params) * ciphertext_size_limit(params)
    helpers = (he_workers - 1) * (cache_bytes // he_workers + HELPER_BASE_BYTES)
    return bundle_size_limit(params, n_steps) + cache_bytes + WORKER_BASE_BYTES + helpers


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def concurrent_session_limit(configured: int, per_session: int, available: int | None) -> int:
    """The configured limit, lowered to what the available memory holds (at least one session)."""
    if available is None:
        return configured
    return max(1, min(configured, available // per_session))


def _session_worker(listener: socket.socket, channel: transport.Channel, hosted: HostedModel, config: CryptoGenConfig):
    listener.close()  # the worker serves one client; only the parent accepts
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    channel.timeout_s = config.timeouts.peer_s
    try:
        run_server_session(channel, hosted, config)
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


def _refuse(channel: transport.Channel, message: str) -> None:
    """Answer a connection the server will not serve with an error, from the
    parent process (no worker is started), and close it."""
    try:
        channel.send("error", message.encode())
    except transport.TransportError:
        pass
    finally:
        channel.close()
    log.warning("refused a client: %s", message)


AUTH_MESSAGE_LIMIT = 1 << 10  # {"token": ...}


def _authenticate(conn: socket.socket, tls, tokens: dict[str, str], timeout_s: float) -> tuple[transport.Channel | None, str | None]:
    """TLS handshake and token check in the accepting process, within ``timeout_s``.

    Returns (channel, client name); (None, None) if the TLS handshake failed;
    (channel, None) if the token is wrong, after the error is sent."""
    try:
        sock = transport.server_handshake(conn, tls, timeout_s, "client")
    except transport.TransportError as exc:
        log.warning("refused a connection: %s", exc)
        return None, None
    channel = transport.Channel(sock, "client", timeout_s=timeout_s)
    channel.limits["auth"] = AUTH_MESSAGE_LIMIT
    try:
        presented = json.loads(channel.recv_payload("auth")).get("token", "")
        name = credentials.client_named_by(tokens, presented if isinstance(presented, str) else "")
    except (transport.TransportError, ValueError, AttributeError) as exc:
        _refuse(channel, f"authentication failed: {exc}")
        return None, None
    if name is None:
        _refuse(channel, "authentication failed: this server does not know that token")
        return None, None
    return channel, name


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
    # Credentials first: a server that cannot authenticate anyone must not spend minutes loading.
    tls = credentials.server_tls_context(config.server.cert_file, config.server.key_file)
    tokens = credentials.load_tokens(config.server.tokens_file) if config.server.tokens_file else None
    if tokens is None:
        raise credentials.CredentialsError("no tokens file: give --tokens FILE (make one with `cryptogen credentials`)")
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
    per_session = session_memory_estimate(hosted, config.server.he_workers)
    max_concurrent = concurrent_session_limit(config.server.max_concurrent_sessions, per_session, available_memory())
    log.info("at most %d sessions at once (configured %d; up to %.0f MiB each)",
             max_concurrent, config.server.max_concurrent_sessions, per_session / 2**20)
    if ready is not None:
        ready(bound)
    fork = multiprocessing.get_context("fork")
    workers: list[tuple[multiprocessing.Process, str]] = []  # (worker, the client's name)
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
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            channel, client = _authenticate(conn, tls, tokens, config.timeouts.auth_s)
            if client is None:
                continue
            limits = config.server
            theirs = sum(1 for _, c in workers if c == client)
            if len(workers) >= max_concurrent:
                _refuse(channel, f"server busy: {len(workers)} sessions running (limit {max_concurrent}); try again later")
                continue
            if theirs >= limits.max_sessions_per_client:
                _refuse(channel, f"too many sessions for client {client!r}: {theirs} running (limit {limits.max_sessions_per_client})")
                continue
            try:
                channel.send("auth.ok", b"")
            except transport.TransportError:
                channel.close()
                continue
            worker = fork.Process(target=_session_worker, args=(listener, channel, hosted, config), daemon=True)
            worker.start()
            channel.close()  # the worker owns the connection (and its TLS state) now
            workers.append((worker, client))
            served += 1
    finally:
        listener.close()
        for w, _ in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
