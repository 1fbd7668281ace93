"""Settings shared by both parties, loadable by name (``configs/NAME.yaml``) or by path."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIRS = (Path(__file__).resolve().parent.parent / "configs", Path(__file__).resolve().parent / "configs")


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the key."""


@dataclass
class HESettings:
    poly_modulus_degree: int = 8192
    plain_modulus_bits: int = 44
    # Bit sizes of the ciphertext modulus primes (None: the library default
    # for the ring size, he/params.py). Part of the handshake fingerprint.
    coeff_modulus_bits: list[int] | None = None
    # Server only (not part of the handshake): bits taken off the client's
    # calibrated fresh noise budget before the server decides which cache
    # blocks to refresh. 0 trusts the calibration; more refreshes earlier.
    noise_reserve_bits: float = 0.0


@dataclass
class FixedPointSettings:
    activation_bits: int = 12
    weight_bits: int = 14


# Who makes CrypTen's correlated randomness in a session (mpc/runtime.py):
#   none   - the two parties alone, with HE (mpc/two_party.py); the default
#   client - the client deals: it then sees every activation, so the weights
#            are as good as public; allowed only with client_sees_activations
SESSION_DEALERS = ("none", "client")


@dataclass
class MPCSettings:
    dealer: str = "none"
    # Must be true, on both sides, for dealer "client": it says that the client
    # learns every activation and can fit the weights from them.
    client_sees_activations: bool = False
    reveal: str = "logits"


@dataclass
class GenerationSettings:
    # Client only. Speculative decoding (generate(assistant_model=...)) and
    # prompt-lookup decoding (generate(prompt_lookup_num_tokens=...)) check k
    # drafted tokens in one pass and then crop the rejected ones from the
    # encrypted cache: the server sees each check's length and each crop, so
    # it learns how many drafted tokens every check accepted (a few bits per
    # check about how predictable the text is; such counts have been used to
    # fingerprint prompts). Refused unless this is true.
    speculative_reveals_acceptance: bool = False


@dataclass
class CacheSettings:
    prefill_layout: str = "auto"


@dataclass
class TimeoutSettings:
    peer_s: float = 120.0
    startup_s: float = 180.0
    idle_s: float = 3600.0
    # Seconds a new connection gets to finish the TLS handshake and present
    # its token; the server's accepting process serves no one else meanwhile.
    auth_s: float = 10.0


@dataclass
class ServerSettings:
    # Server only (not part of the handshake).
    # The name announced to clients in the handshake ("" announces none): the
    # handshake otherwise carries the model's public shapes only, nothing that
    # identifies the checkpoint.
    model_name: str = ""
    # Benchmark and diagnostic operations (filling the cache with random
    # ciphertexts, per-phase timings, memory): off unless the operator turns
    # them on (`cryptogen serve --diagnostics`); on for the local server a
    # client starts for itself (`from_pretrained` without `server=`).
    diagnostics: bool = False
    # Sessions served at once (one worker process each): a client beyond this
    # is refused, with an error that says so, before any worker is started.
    # The server lowers it to what its available memory holds at start, at
    # the most one session can take (keys, a full encrypted cache, working
    # set: server.serve.session_memory_estimate).
    max_concurrent_sessions: int = 4
    # Sessions one client (a name in the tokens file) may hold at once.
    max_sessions_per_client: int = 4
    # Processes that share each session's HE work (server/he_workers.py):
    # the session's own and he_workers - 1 helpers forked at its start. SEAL
    # holds the GIL, so one process uses one core; give a session as many as
    # the cores it may take. Results are the same for any number.
    he_workers: int = 1
    # With he_workers > 1: a product is split over the workers only when the
    # planners' estimate of its one-process time is at least this many
    # seconds; smaller ones cost more to ship between processes than they
    # save (the default is measured on 2 cores: server/he_workers.py).
    he_split_min_seconds: float = 0.15
    # TLS certificate and private key (PEM) the server proves itself with,
    # and the tokens file naming the clients it serves
    # (protocol/credentials.py; `cryptogen credentials` makes all three).
    # A server does not start without them.
    cert_file: str = ""
    key_file: str = ""
    tokens_file: str = ""


@dataclass
class CryptoGenConfig:
    he: HESettings = field(default_factory=HESettings)
    fixed_point: FixedPointSettings = field(default_factory=FixedPointSettings)
    mpc: MPCSettings = field(default_factory=MPCSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    def validate(self) -> "CryptoGenConfig":
        if self.mpc.dealer == "ttp":
            raise ConfigError(
                "mpc.dealer 'ttp' is not available in sessions: a trusted dealer must run on a third host that "
                "neither party controls, and there is no such service yet. Use 'none' (the default): the two "
                "parties make the correlated randomness themselves."
            )
        if self.mpc.dealer not in SESSION_DEALERS:
            raise ConfigError(f"mpc.dealer must be one of {SESSION_DEALERS}, got {self.mpc.dealer!r}")
        if self.mpc.dealer == "client" and self.mpc.client_sees_activations is not True:
            raise ConfigError(
                "mpc.dealer 'client' lets the client see every activation, from which it can fit the model's "
                "weights; set mpc.client_sees_activations: true (on both sides) only if the weights are public"
            )
        if self.mpc.reveal not in ("logits", "token"):
            raise ConfigError(f"mpc.reveal must be 'logits' or 'token', got {self.mpc.reveal!r}")
        if self.cache.prefill_layout not in ("auto", "outer", "inner"):
            raise ConfigError(f"cache.prefill_layout must be 'auto', 'outer' or 'inner', got {self.cache.prefill_layout!r}")
        if not 0 < self.fixed_point.activation_bits <= 16:
            raise ConfigError(f"fixed_point.activation_bits must be in 1..16, got {self.fixed_point.activation_bits}")
        if not 0 < self.fixed_point.weight_bits <= 20:
            raise ConfigError(f"fixed_point.weight_bits must be in 1..20, got {self.fixed_point.weight_bits}")
        if self.he.coeff_modulus_bits is not None:
            from .he.params import check_coeff_modulus_bits

            try:
                check_coeff_modulus_bits(self.he.coeff_modulus_bits)
            except ValueError as exc:
                raise ConfigError(f"he.coeff_modulus_bits: {exc}") from None
        if self.he.noise_reserve_bits < 0:
            raise ConfigError(f"he.noise_reserve_bits must be >= 0, got {self.he.noise_reserve_bits}")
        if self.timeouts.peer_s <= 0 or self.timeouts.startup_s <= 0 or self.timeouts.auth_s <= 0:
            raise ConfigError("timeouts must be positive")
        if not isinstance(self.server.model_name, str) or len(self.server.model_name) > 200:
            raise ConfigError("server.model_name must be a string of at most 200 characters")
        for key in ("max_concurrent_sessions", "max_sessions_per_client", "he_workers"):
            value = getattr(self.server, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"server.{key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.generation.speculative_reveals_acceptance, bool):
            raise ConfigError("generation.speculative_reveals_acceptance must be true or false, got "
                              f"{self.generation.speculative_reveals_acceptance!r}")
        if isinstance(self.server.he_split_min_seconds, bool) or not isinstance(self.server.he_split_min_seconds, (int, float)) \
                or self.server.he_split_min_seconds < 0:
            raise ConfigError(f"server.he_split_min_seconds must be a number >= 0, got {self.server.he_split_min_seconds!r}")
        if not isinstance(self.server.diagnostics, bool):
            raise ConfigError(f"server.diagnostics must be true or false, got {self.server.diagnostics!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f)

    @classmethod
    def from_dict(cls, data: dict) -> "CryptoGenConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in (data or {}).items():
            if key not in sections:
                raise ConfigError(f"unknown config section {key!r} (known: {sorted(sections)})")
            section_cls = {
                "he": HESettings, "fixed_point": FixedPointSettings, "mpc": MPCSettings,
                "cache": CacheSettings, "generation": GenerationSettings, "timeouts": TimeoutSettings, "server": ServerSettings,
            }[key]
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = set(value or {}) - known
            if unknown:
                raise ConfigError(f"unknown key(s) {sorted(unknown)} in section {key!r} (known: {sorted(known)})")
            kwargs[key] = section_cls(**(value or {}))
        return cls(**kwargs).validate()


def load_config(name_or_path: str | Path | None = None) -> CryptoGenConfig:
    """``None`` -> defaults; a name -> ``configs/<name>.yaml``; otherwise a YAML file path."""
    if name_or_path is None:
        return CryptoGenConfig().validate()
    if isinstance(name_or_path, CryptoGenConfig):
        return name_or_path.validate()
    path = Path(name_or_path)
    if not path.suffix:
        candidates = [d / f"{name_or_path}.yaml" for d in CONFIG_DIRS]
        path = next((c for c in candidates if c.exists()), candidates[0])
    if not path.exists():
        raise ConfigError(f"no config named or at {str(name_or_path)!r} (looked for {path})")
    with open(path) as f:
        return CryptoGenConfig.from_dict(yaml.safe_load(f))
