"""A secure generation session: handshake, key transfer, CrypTen set-up, then steps.

The server side (``run_server_session``) runs in its own worker process, one
per client (see ``server.serve``); the client side (``ClientSession``) runs
in the user's process, under ``CryptoGenForCausalLM``.

One TLS connection carries the whole session (protocol/transport.py); the
client has checked the server's certificate before its first byte.

Authentication, answered by the server's accepting process (server/serve.py)
before any worker exists:

    client -> server  auth     {token}
    server -> client  auth.ok, or error (wrong token, server busy, too many
                      sessions for this client) and the connection closes

Handshake, with the client's own worker, before any expensive work:

    client -> server  hello    {protocol, he params, fixed point, dealer}
    server -> client  welcome  {session id, model shape (and a name only if
                      the operator announces one), special token ids and
                      generation defaults}
                      or error naming the mismatch (then the worker exits)
    client -> server  he_bundle  public + relinearization + Galois keys only
    both              join CrypTen on the same connection; with dealer "none"
                      (the default) the client also sends the public keys of
                      its cross-product HE (mpc/two_party.py); nobody else
                      takes part

Then requests, each answered in lockstep by the SPMD protocol:

    {"op": "forward", "tokens": k, "logits_for": [...]}   k secure steps
    {"op": "prepare", "tokens": n}   correlations for the next n decode tokens
    {"op": "reset"} | {"op": "stats"} | {"op": "close"}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import secrets

from ..config import CryptoGenConfig
from ..he import ClientHE, HEParams, ServerHE
from ..he.attention import calibrate_attention_slack
from ..he.keys import bundle_size_limit, ciphertext_size_limit
from ..mpc import runtime
from . import credentials, transport
from ..families import ModelShape
from .decoder import PREFILL_LAYOUTS, PROTOCOL_VERSION, DecoderPlans, FixedPoint, PrefillLayoutPolicy, SecureDecoder
from .party import CLIENT, SERVER, Party
from ..server.he_workers import HEWorkers


log = logging.getLogger(__name__)


class HandshakeError(RuntimeError):
    """Client and server cannot work together; the message names the mismatch."""


def _json(payload: bytes) -> dict:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise transport.ProtocolError(f"malformed JSON message: {exc}") from exc


def he_params_from(config: CryptoGenConfig) -> HEParams:
    return HEParams(
        poly_modulus_degree=config.he.poly_modulus_degree,
        plain_modulus_bits=config.he.plain_modulus_bits,
        coeff_modulus_bits=config.he.coeff_modulus_bits,
    )


def fixed_point_from(config: CryptoGenConfig) -> FixedPoint:
    return FixedPoint(config.fixed_point.activation_bits, config.fixed_point.weight_bits)


def _hello(config: CryptoGenConfig) -> dict:
    return {
        "protocol": PROTOCOL_VERSION,
        "he_fingerprint": he_params_from(config).fingerprint(),
        "he_params": config.he.__dict__,
        "fixed_point": config.fixed_point.__dict__,
        "dealer": config.mpc.dealer,
        "reveal": config.mpc.reveal,
        "prefill_layout": config.cache.prefill_layout,
    }


def check_hello(theirs: dict, ours: dict) -> None:
    """Raise HandshakeError naming the first setting on which the two sides differ."""
    for key, what in (
        ("protocol", "protocol version"),
        ("he_fingerprint", "HE parameters"),
        ("fixed_point", "fixed-point settings"),
        ("dealer", "dealer mode"),
    ):
        if theirs.get(key) != ours.get(key):
            detail = f"client {theirs.get(key)!r}, server {ours.get(key)!r}"
            if key == "he_fingerprint":
                detail = f"client {theirs.get('he_params')}, server {ours.get('he_params')}"
            raise HandshakeError(f"{what} mismatch: {detail}")
    # The server's reveal setting is the most it will open; a client may ask for less.
    if ours.get("reveal") == "token" and theirs.get("reveal") != "token":
        raise HandshakeError("output reveal policy mismatch: the server opens only tokens (mpc.reveal: token), the client asked for logits")
    if theirs.get("reveal") not in ("logits", "token"):
        raise HandshakeError(f"unknown reveal mode {theirs.get('reveal')!r}")
    # The cache layout is the client's choice (it changes the cost, not what anyone learns).
    if theirs.get("prefill_layout") not in PREFILL_LAYOUTS:
        raise HandshakeError(f"unknown cache prefill layout {theirs.get('prefill_layout')!r} (known: {PREFILL_LAYOUTS})")


class CorrelationPlan:
    """What one decode token consumes of each kind of correlated randomness,
    measured on the last one-token pass, so that ``prepare`` can make the next
    tokens' share ahead of use (while the user is idle). Both parties measure
    the same counts (SPMD), so they prepare the same batches without a word
    about sizes. Attention grows with the context, so a quarter more than the
    measured use is made (PREPARE_MARGIN); values left over stay in the pools
    for later tokens, so the margin costs nothing but earlier work."""

    PREPARE_MARGIN = 1.25

    def __init__(self):
        self.per_token: dict[str, int] | None = None
        self._before: dict[str, int] | None = None

    @staticmethod
    def _provider():
        provider = runtime.correlation_provider()
        return provider if hasattr(provider, "consumption") else None  # dealer modes have nothing to prepare

    def start_pass(self, n_tokens: int) -> None:
        provider = self._provider()
        self._before = provider.consumption() if provider is not None and n_tokens == 1 else None

    def end_pass(self) -> None:
        if self._before is not None:
            after = self._provider().consumption()
            self.per_token = {kind: after[kind] - self._before[kind] for kind in after}
            self._before = None

    def prepare(self, tokens: int) -> bool:
        """Make the correlations of `tokens` decode tokens now; False when
        there is nothing to size them from yet (no decode token so far)."""
        provider = self._provider()
        if provider is None or self.per_token is None:
            return False
        provider.prepare({kind: math.ceil(tokens * n * self.PREPARE_MARGIN) for kind, n in self.per_token.items()})
        return True


# The server's limits for the small messages (JSON); the HE key bundle's is
# derived from the parameters and the Galois steps the model needs.
CONTROL_MESSAGE_LIMITS = {"hello": 1 << 16, "request": 1 << 16}


def cache_ciphertexts_bound(plans: DecoderPlans, shape: ModelShape, he_params: HEParams) -> int:
    """Ciphertexts an encrypted cache of ``n_positions`` tokens can hold, K and
    V, every layer: inner blocks of B tokens plus the outer layout's head_dim
    diagonals per tile (a cache holds a prompt in one and the rest in the other)."""
    T = shape.n_positions
    per_layer = -(-T // plans.cache_layout.B) + shape.head_dim * (1 + T * shape.n_kv_head // he_params.row_size)
    return 2 * shape.n_layer * per_layer


def server_message_limits(plans: DecoderPlans, shape: ModelShape, he_params: HEParams) -> dict[str, int]:
    """The longest message of each kind the server accepts from a client of
    this model, from the plan: a bound on the ciphertexts a pass of up to
    ``n_positions`` tokens can carry, times the largest serialized ciphertext.

    - ``embed.onehot``: one ciphertext per vocabulary chunk per token;
    - ``refresh.fresh`` and ``bench.fill``: at most the whole encrypted cache
      (inner blocks of B tokens, or the outer layout's head_dim diagonals per
      tile), K and V, every layer;
    - ``to_he.ciphertexts``: the input of one HE product for a whole pass
      (up to 8 ciphertexts per token: a split plan's chunks, he/matvec.py),
      or a pass's queries, keys and values for the cache (kv_groups query
      ciphertexts per token in each layout, one key and one value) plus a
      cache's worth of keys and values for the prefill layouts;
    - ``matmul.ciphertexts``: the two operands of a prompt's attention product;
    - ``mpc``: CrypTen's largest opening, int64 values for every token of a
      pass times the widest per-token tensor (vocabulary, the MLP's hidden
      layer, q|k|v, or the attention scores of all heads), or a correlation
      batch message."""
    from ..mpc.two_party import MAX_MESSAGE_BYTES as CORRELATION_MESSAGE_BYTES

    ct_bytes = ciphertext_size_limit(he_params)
    T = shape.n_positions
    cache_cts = cache_ciphertexts_bound(plans, shape, he_params)
    per_token = max(8, 2 * shape.kv_groups + 2)  # to_he ciphertexts per token of a pass, at most
    framing = 8 * (1 + cache_cts + T * (plans.embed_chunks + per_token))  # pack_blobs' length words
    return {
        "embed.onehot": T * plans.embed_chunks * ct_bytes + framing,
        "refresh.fresh": cache_cts * ct_bytes + framing,
        "bench.fill": cache_cts * ct_bytes + framing,
        "to_he.ciphertexts": (T * per_token + cache_cts) * ct_bytes + framing,
        # A prompt's attention on shares: both operands of Q K^T (head_dim
        # ciphertexts each) or of P V (one per token each).
        "matmul.ciphertexts": 2 * max(T, shape.head_dim) * ct_bytes + framing,
        "step.refresh_plan": 1 << 20,
        transport.MPC_KIND: max(CORRELATION_MESSAGE_BYTES, 8 * T * max(shape.vocab_size, 2 * shape.d_mlp, 3 * shape.d_attn, shape.n_head * T)),
    }


class BadRequest(ValueError):
    """A request the server refuses (it answers with an error and goes on)."""


def _check_count(value, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{what} is {value!r}; {lo}..{hi} allowed here")
    return value


def check_prepare_tokens(tokens, n_tokens: int, n_positions: int) -> int:
    """The number of tokens a prepare request may ask for: 1 .. the room left in the context."""
    return _check_count(tokens, 1, max(n_positions - n_tokens, 1), "prepare's token count")


# Sampling inside MPC (reveal: token): the softmax's exp covers x - max down to
# -2**10 (ops.SAMPLE_EXP_ITERATIONS), which logits / temperature must not pass.
MIN_SAMPLE_TEMPERATURE = 0.25
MAX_SAMPLE_TEMPERATURE = 100.0


def check_temperature(temperature) -> float | None:
    """None (greedy) or a temperature for sampling inside MPC; BadRequest otherwise."""
    if temperature is None:
        return None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        MIN_SAMPLE_TEMPERATURE <= temperature <= MAX_SAMPLE_TEMPERATURE
    ):
        raise BadRequest(f"sampling temperature must be a number in [{MIN_SAMPLE_TEMPERATURE}, {MAX_SAMPLE_TEMPERATURE}], "
                         f"got {temperature!r}")
    return float(temperature)


def check_request(request: dict, n_tokens: int, n_positions: int, diagnostics: bool, reveal: str = "logits") -> str:
    """The request's op, once every field it needs is valid for a session
    holding n_tokens of n_positions; BadRequest otherwise. Both the server
    (before acting) and, through the same rules, the client's methods
    refuse what would fail, so a refusal never leaves the two out of step."""
    if not isinstance(request, dict):
        raise BadRequest("a request is a JSON object")
    op = request.get("op")
    if op == "forward":
        flags = request.get("logits_for")
        if not isinstance(flags, list) or not all(isinstance(f, bool) for f in flags):
            raise BadRequest("forward needs logits_for, a list of true/false per token")
        _check_count(len(flags), 1, n_positions - n_tokens, "the number of tokens to run")
        if check_temperature(request.get("temperature")) is not None and reveal != "token":
            raise BadRequest("sampling inside MPC (temperature) is for mpc.reveal: token")
        if not isinstance(request.get("packed", True), bool):
            raise BadRequest("forward's packed is true or false")
    elif op == "prepare":
        check_prepare_tokens(request.get("tokens"), n_tokens, n_positions)
    elif op == "crop":
        _check_count(request.get("length"), 0, n_tokens, "crop's length")
    elif op == "fill_for_benchmark":
        if not diagnostics:
            raise BadRequest("benchmark operations are off on this server (start it with --diagnostics)")
        if n_tokens:
            raise BadRequest("fill_for_benchmark needs an empty cache")
        _check_count(request.get("length"), 1, n_positions - 1, "fill_for_benchmark's length")
    elif op not in ("reset", "stats", "close"):
        raise BadRequest(f"unknown request {op!r}")
    return op


def _mpc_config(config: CryptoGenConfig) -> runtime.MPCConfig:
    """CrypTen runs over the session's own channel: no host or port of its own."""
    return runtime.MPCConfig(dealer=config.mpc.dealer, timeout_s=config.timeouts.peer_s)


# ---------------------------------------------------------------------------
# Server side (runs in a per-session worker process)
# ---------------------------------------------------------------------------
def run_server_session(channel: transport.Channel, hosted, config: CryptoGenConfig) -> None:
    """Serve one (authenticated) client until it closes. ``hosted`` is a ``server.serve.HostedModel``."""
    channel.limits.update(CONTROL_MESSAGE_LIMITS)
    hello = _json(channel.recv_payload("hello"))
    try:
        check_hello(hello, _hello(config))
    except HandshakeError as exc:
        channel.send("error", f"handshake refused: {exc}".encode())
        raise
    session_id = secrets.token_hex(16)  # 128 bits from the OS CSPRNG: unguessable
    welcome = {"session": session_id, "shape": hosted.shape.to_dict(), "generation": hosted.generation}
    channel.send("welcome", json.dumps(welcome).encode())

    policy = PrefillLayoutPolicy(hosted.shape, hosted.he_params, hello["prefill_layout"])
    needed_steps = set(hosted.plans.galois_steps()) | policy.galois_steps()
    channel.limits["he_bundle"] = bundle_size_limit(hosted.he_params, len(needed_steps))
    channel.limits.update(server_message_limits(hosted.plans, hosted.shape, hosted.he_params))
    try:
        he = ServerHE.from_bundle(channel.recv_payload("he_bundle"), expect_fingerprint=hosted.he_params.fingerprint())
    except ValueError as exc:
        channel.send("error", f"HE bundle refused: {exc}".encode())
        raise HandshakeError(f"HE bundle refused: {exc}") from None
    missing = needed_steps - set(he.galois_steps)
    if missing:
        channel.send("error", f"HE bundle lacks Galois keys for steps {sorted(missing)[:8]}".encode())
        raise HandshakeError(f"HE bundle lacks Galois keys for steps {sorted(missing)}")
    if config.he.noise_reserve_bits:  # the server's own, more conservative refresh policy
        he.noise_model = dataclasses.replace(he.noise_model, fresh=he.noise_model.fresh - config.he.noise_reserve_bits)

    # The helpers are forked now: before CrypTen's runtime starts any thread.
    he_workers = HEWorkers(he, hosted.encoded, hosted.plans, config.server.he_workers, config.timeouts.peer_s,
                           idle_timeout_s=config.timeouts.idle_s + config.timeouts.peer_s,
                           min_split_seconds=config.server.he_split_min_seconds)
    runtime.init_party(SERVER, _mpc_config(config), channel)
    try:
        party = Party(SERVER, channel, he)
        runner = SecureDecoder(party, hosted.shape, hosted.plans, hosted.fixed_point, hosted.encoded, policy, he_workers)
        plan = CorrelationPlan()
        while True:
            request = _json(channel.recv_payload("request", timeout_s=config.timeouts.idle_s))
            try:
                op = check_request(request, runner.n_tokens, hosted.shape.n_positions, config.server.diagnostics, hello["reveal"])
            except BadRequest as exc:
                # The client's own checks make these unreachable for our client:
                # answer, and wait for its next request (the session goes on).
                channel.send("error", f"bad request: {exc}".encode())
                continue
            if op == "forward":
                plan.start_pass(len(request["logits_for"]))
                logits = runner.step(None, request["logits_for"], packed=request.get("packed", True))
                plan.end_pass()
                if logits is not None:
                    runner.reveal_to_client(logits, hello["reveal"], request.get("temperature"))
            elif op == "prepare":
                plan.prepare(request["tokens"])
            elif op == "reset":
                runner.reset()
            elif op == "crop":
                runner.crop(request["length"])
            elif op == "fill_for_benchmark":
                channel.send("fill.ack", b"")
                runner.fill_for_benchmark(request["length"])
            elif op == "stats":
                stats = {
                    "tokens": runner.n_tokens,
                    "cache_bytes": runner.cache_nbytes(),
                    "passes": runner.passes,
                    "tokens_processed": runner.tokens_processed,
                    "refreshed_blocks": runner.refreshed_blocks,
                }
                if config.server.diagnostics:
                    stats["timings"] = dict(runner.timings)
                    stats["circuit_privacy_s"] = he.masking_s  # re-randomising and flooding what the client decrypts
                    stats["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
                    stats["he_workers"] = he_workers.n
                    helpers = he_workers.memory_kib()
                    stats["he_helpers_pss_mb"] = [round(m["pss"] / 1024, 1) for m in helpers]
                    stats["he_helpers_private_mb"] = [round(m["private"] / 1024, 1) for m in helpers]
                channel.send("stats", json.dumps(stats).encode())
            elif op == "close":
                return
    finally:
        he_workers.close()
        runtime.shutdown()


# ---------------------------------------------------------------------------
# Client side (the user's process)
# ---------------------------------------------------------------------------
class ClientSession:
    """The client's end of one secure session with a server at ``host:port``.

    server_cert: the server's certificate or its CA (PEM file path or PEM
        bytes); None trusts the system's CAs. The connection is refused unless
        the server proves it holds that certificate's key for ``host``.
    token: this client's API token (protocol/credentials.py).

    A process may hold several sessions (several secure models): each keeps
    its own CrypTen state (``runtime.SessionMPC``) and puts it in place before
    it runs. Use them from one thread at a time.
    """

    def __init__(self, host: str, port: int, config: CryptoGenConfig | None = None, *, server_cert=None, token: str | None = None):
        self.mpc = None
        self.closed = False
        self.config = config or CryptoGenConfig()
        self.config.validate()
        if not token:
            raise credentials.CredentialsError("a token is needed to use a server: pass token= (the server's operator issues it)")
        tls = credentials.client_tls_context(server_cert)
        timeout = self.config.timeouts.peer_s
        self.channel = transport.connect(host, port, f"server {host}:{port}", timeout_s=timeout, retry_s=5.0, tls=tls)
        try:
            self._authenticate(token)
            self._open()
        except BaseException:
            self._teardown()
            raise

    def _authenticate(self, token: str):
        self.channel.send("auth", json.dumps({"token": token}).encode())
        try:
            self.channel.recv_payload("auth.ok", timeout_s=self.config.timeouts.startup_s)
        except transport.PeerReportedError as exc:
            raise HandshakeError(f"the server refused this client: {exc.peer_message}") from None

    def _open(self):
        self.channel.send("hello", json.dumps(_hello(self.config)).encode())
        try:
            payload = self.channel.recv_payload("welcome", timeout_s=self.config.timeouts.startup_s)
        except transport.PeerReportedError as exc:
            raise HandshakeError(exc.peer_message) from None
        welcome = _json(payload)
        self.session_id = welcome["session"]
        self.shape = ModelShape.from_dict(welcome["shape"])
        self.generation = welcome.get("generation", {})  # the server's public decoding defaults (server/serve.py)
        he_params = he_params_from(self.config)
        self.plans = DecoderPlans(self.shape, he_params)
        self.policy = PrefillLayoutPolicy(self.shape, he_params, self.config.cache.prefill_layout)
        self.he = ClientHE(he_params)
        # Tighten the server's noise estimates for this model's attention
        # kernels (it refreshes cache blocks by them: he/attention.py).
        steps = sorted(set(self.plans.galois_steps()) | self.policy.galois_steps())
        self.he.noise_model.attention_slack = calibrate_attention_slack(self.he, self.shape.n_kv_head, self.shape.head_dim, steps)
        self.channel.send("he_bundle", self.he.public_bundle(steps))

        self.mpc = runtime.SessionMPC(CLIENT, _mpc_config(self.config), self.channel)
        self.party = Party(CLIENT, self.channel, self.he)
        self.runner = SecureDecoder(self.party, self.shape, self.plans, fixed_point_from(self.config), policy=self.policy)
        self.plan = CorrelationPlan()

    # -- requests ---------------------------------------------------------------
    def _request(self, **request):
        """Send a request the server will accept (the same rules, checked here
        first: a refused request must not leave the two sides out of step).
        Whether benchmark operations are on is for the server to say."""
        check_request(request, self.runner.n_tokens, self.shape.n_positions, diagnostics=True, reveal=self.config.mpc.reveal)
        self.channel.send("request", json.dumps(request).encode())

    def forward(self, token_ids: list[int], logits_for: list[bool], temperature: float | None = None, packed: bool = True):
        """Run ``token_ids`` through the secure model in one pass.

        Returns float64 logits (n_flagged x vocab) for the flagged positions (a
        suffix), or None if none is flagged. With ``mpc.reveal: token`` only a
        token is opened: the row is 0 at that token and -inf elsewhere; the
        argmax, or with ``temperature`` a token drawn from
        softmax(logits / temperature) inside MPC. ``packed=False`` runs the
        pass token by token (one token per ciphertext, attention over the
        cache): the benchmarks' baseline; the result is the same.
        """
        temperature = check_temperature(temperature)
        if len(token_ids) != len(logits_for):
            raise ValueError("token_ids and logits_for differ in length")
        if not token_ids:
            raise ValueError("a forward pass needs at least one token")
        if self.runner.n_tokens + len(token_ids) > self.shape.n_positions:
            raise ValueError(
                f"sequence of {self.runner.n_tokens + len(token_ids)} tokens exceeds the model's context of "
                f"{self.shape.n_positions} tokens"
            )
        for tok in token_ids:
            if not 0 <= int(tok) < self.shape.vocab_size:
                raise ValueError(f"token id {tok} outside the vocabulary (0..{self.shape.vocab_size - 1})")
        flags = [bool(w) for w in logits_for]
        self.mpc.activate()
        self._request(op="forward", logits_for=flags, packed=bool(packed), **({} if temperature is None else {"temperature": temperature}))
        try:
            self.plan.start_pass(len(flags))
            logits = self.runner.step([int(t) for t in token_ids], flags, packed=bool(packed))
            self.plan.end_pass()
            if logits is None:
                return None
            return self.runner.reveal_to_client(logits, self.config.mpc.reveal, temperature)
        except Exception as exc:
            # A dead or silent server becomes a PeerError naming it.
            raise runtime.translate_peer_error(exc) from exc

    def prepare_correlations(self, tokens: int) -> bool:
        """Make the correlated randomness of the next `tokens` decode tokens
        now, e.g. while the user reads or types, so that those tokens run only
        the online protocol. Sized from the last decode token (returns False,
        and does nothing, before the first one). Costs what those tokens'
        offline phase would have cost."""
        tokens = check_prepare_tokens(tokens, self.runner.n_tokens, self.shape.n_positions)
        self.mpc.activate()
        self._request(op="prepare", tokens=tokens)
        try:
            return self.plan.prepare(tokens)
        except Exception as exc:
            raise runtime.translate_peer_error(exc) from exc

    @property
    def n_tokens(self) -> int:
        return self.runner.n_tokens

    def reset(self):
        self._request(op="reset")
        self.runner.reset()

    def crop(self, n_tokens: int):
        """Keep the first n_tokens of the encrypted cache (nothing is decrypted)."""
        if not 0 <= n_tokens <= self.runner.n_tokens:
            raise ValueError(f"cannot crop a cache of {self.runner.n_tokens} tokens to {n_tokens}")
        self.mpc.activate()
        self._request(op="crop", length=int(n_tokens))
        self.runner.crop(n_tokens)

    def fill_for_benchmark(self, n_tokens: int, seed: int = 0):
        """Benchmarks only: an empty cache gets n_tokens of random encrypted keys and
        values (see ``SecureDecoder.fill_for_benchmark``), so a decode step can be
        timed at a long context without running a prefill."""
        if self.runner.n_tokens:
            raise ValueError("fill_for_benchmark needs an empty cache: reset() first")
        self.mpc.activate()
        self._request(op="fill_for_benchmark", length=int(n_tokens))
        try:
            self.channel.recv_payload("fill.ack")
        except transport.PeerReportedError as exc:
            raise RuntimeError(f"the server refused to fill the cache: {exc.peer_message}") from None
        self.runner.fill_for_benchmark(n_tokens, seed)

    def correlation_stats(self) -> dict:
        """This client's account of the correlated randomness made so far (dealer "none"):
        seconds spent, correlations made, by kind; {} in other modes."""
        self.mpc.activate()
        return dict(getattr(runtime.correlation_provider(), "stats", {}))

    def stats(self) -> dict:
        """Token count, encrypted-cache bytes and the server's timings; nothing is decrypted."""
        self._request(op="stats")
        return _json(self.channel.recv_payload("stats"))

    def close(self):
        if self.closed:
            return
        try:
            self._request(op="close")
        except transport.TransportError:
            pass
        self._teardown()

    def _teardown(self):
        self.closed = True
        if self.mpc is not None:
            try:
                self.mpc.close()
            except Exception as exc:  # noqa: BLE001 (closing; the peer may be gone)
                log.info("closing MPC session: %s", exc)
        self.channel.close()
