"""HuggingFace integration: ``CryptoGenForCausalLM`` and ``EncryptedCache``.

``CryptoGenForCausalLM`` is a ``PreTrainedModel`` with ``GenerationMixin``
whose ``forward`` runs secure steps through a ``ClientSession``; everything
``generate()`` does around it (logits processors, sampling, stopping
criteria, streamers) is unchanged. The client process holds no weights: it
reads the checkpoint's ``config.json`` (public hyper-parameters) at most; the
server process loads the weights.

``EncryptedCache`` is the ``Cache`` that ``generate()`` threads through the
steps. Its ciphertexts live at the server; it holds the session handle and
the token count, and answers length/mask/size questions without decrypting.
Passing it to a later ``generate()`` continues the conversation with no new
prefill.
"""

from __future__ import annotations

import atexit
import collections
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMode
from transformers.generation.logits_process import TemperatureLogitsWarper
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import CryptoGenConfig, load_config
from ..families import ModelShape
from ..protocol.session import ClientSession


class CryptoGenModelConfig(PretrainedConfig):
    """The served model's public description (``families.ModelShape``, as the
    handshake carries it) under HF's usual names, plus where the secure
    server is (``cryptogen``); no weights involved. One config class for every
    family: the client runs no modeling code of its own."""

    model_type = "cryptogen"
    attribute_map = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                     "n_positions": "max_position_embeddings"}

    def __init__(self, shape: dict | None = None, cryptogen: dict | None = None, **kwargs):
        self.shape = shape or {}
        self.cryptogen = cryptogen or {}
        if shape:
            s = ModelShape.from_dict(shape)
            kwargs.setdefault("name_or_path", s.name)
            self.num_hidden_layers, self.hidden_size, self.vocab_size = s.n_layer, s.n_embd, s.vocab_size
            self.num_attention_heads, self.num_key_value_heads, self.head_dim = s.n_head, s.n_kv_head, s.head_dim
            self.intermediate_size, self.max_position_embeddings = s.d_mlp, s.n_positions
        super().__init__(**kwargs)


class EncryptedLayer(CacheLayerMixin):
    """One layer's view of the server-side encrypted cache: a length, no tensors."""

    is_compileable = False
    is_croppable = True

    def __init__(self):
        super().__init__()
        self.seq_length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # pragma: no cover (never called)
        raise RuntimeError("EncryptedLayer holds no plaintext keys or values")

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("the encrypted cache is updated by the secure protocol at the server, not with plaintext tensors")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seq_length = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported by the encrypted cache (batch size 1 only)")


class EncryptedCache(Cache):
    """Handle on the encrypted KV cache a ``CryptoGenForCausalLM``'s server keeps."""

    def __init__(self, model: "CryptoGenForCausalLM"):
        super().__init__(layers=[EncryptedLayer() for _ in range(model.config.n_layer)])
        self.session = model.session
        # The server keeps one cache per session: a new EncryptedCache starts a new conversation.
        if self.session.n_tokens:
            self.session.reset()
        model._live_cache = weakref.ref(self)

    def __deepcopy__(self, memo):
        raise TypeError(
            "an EncryptedCache is a handle on the one encrypted cache the server keeps for this session and cannot "
            "be copied (HF's prompt-reuse recipe deep-copies a prefix cache). Reuse a prefix by cropping instead: "
            "cache.crop(-n) removes the last n tokens, and generate() then continues from the prefix"
        )

    def __copy__(self):
        return self.__deepcopy__({})

    # -- what the protocol reports -------------------------------------------
    def _advance(self, n_tokens: int) -> None:
        for layer in self.layers:
            layer.seq_length += n_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seq_length

    @property
    def nbytes(self) -> int:
        """Bytes of ciphertext the server holds for this cache (asked, not decrypted)."""
        return int(self.session.stats()["cache_bytes"])

    def reset(self) -> None:
        self.session.reset()
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (HF's convention: a negative count).

        The server drops whole ciphertext blocks and re-encrypts the last kept
        block through a masked round trip with the removed slots zeroed;
        nothing is decrypted in the clear.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        self.session.crop(keep)
        for layer in self.layers:
            layer.seq_length = keep

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported by the encrypted cache (batch size 1 only)")

    def __repr__(self) -> str:
        return f"EncryptedCache(tokens={self.get_seq_length()}, layers={len(self.layers)})"


# The generate() option behind each logits processor transformers adds (for error messages).
_PROCESSOR_OPTIONS = {
    "TopKLogitsWarper": "top_k",
    "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids",
    "MinLengthLogitsProcessor": "min_length",
    "MinNewTokensLengthLogitsProcessor": "min_new_tokens",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SequenceBiasLogitsProcessor": "sequence_bias",
}


def _read_secure_handle(path) -> dict | None:
    """The ``cryptogen`` section of a folder written by ``save_pretrained``, or None."""
    if path is None or not (Path(path) / "config.json").is_file():
        return None
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") not in (CryptoGenModelConfig.model_type, "cryptogen-gpt2"):  # the latter: folders saved before LLaMA support
        return None
    handle = config.get("cryptogen")
    if not isinstance(handle, dict) or not (handle.get("checkpoint") or handle.get("server")):
        raise ValueError(f"{path} is a cryptogen_hf model folder that names neither a checkpoint nor a server")
    return handle


def _no_new_tokens_message(cached: int, given: int) -> str:
    return (
        f"no new tokens to run: the encrypted cache already holds {cached} tokens and the input has {given}. "
        "To continue a conversation, pass the whole conversation (the cached tokens followed by the new "
        "ones); only the new ones are run"
    )


def start_local_server(model_path: str, settings: CryptoGenConfig, *, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()):
    """Start ``cryptogen serve`` as a child process listening on ``host``
    (default loopback); return (process, port, server certificate PEM, token).
    ``prefix`` goes before the command (``cryptogen bench --net`` runs the
    server in a network namespace of its own with ``ip netns exec NAME``).

    The same program a remote deployment runs, so local mode exercises the
    real server (TLS and token included); it loads the weights, this process
    never does. Its certificate and token are made here, fresh for each
    start, and the client pins that certificate; the files are deleted once
    the server has read them.
    """
    from ..protocol import credentials

    # A local server serves this process only, for its user: its benchmark and
    # diagnostic operations (timings, memory, cache fills) are on.
    local = CryptoGenConfig.from_dict(settings.to_dict())
    local.server.diagnostics = True
    # Clients dial loopback (here, or a relay in front of ``host``).
    cert, key = credentials.self_signed_certificate(["127.0.0.1", "localhost"], days=7)
    token = credentials.new_token()
    with tempfile.TemporaryDirectory(prefix="cryptogen-local-") as private:  # mode 0700
        files = {"cert": Path(private, "server.pem"), "key": Path(private, "server.key"), "tokens": Path(private, "tokens.txt")}
        files["cert"].write_bytes(cert)
        files["key"].write_bytes(key)
        files["tokens"].write_text(f"local {token}\n")
        local.server.cert_file, local.server.key_file, local.server.tokens_file = map(str, files.values())
        settings_file = Path(private, "settings.yaml")
        local.save(settings_file)
        command = [*prefix, sys.executable, "-m", "cryptogen_hf.cli", "serve", "--model", str(model_path), "--host", host, "--port", "0",
                   "--config", str(settings_file), "--quiet"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        stderr_tail = collections.deque(maxlen=30)
        threading.Thread(target=lambda: [stderr_tail.append(line) for line in proc.stderr], daemon=True).start()
        deadline = time.monotonic() + settings.timeouts.startup_s
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if proc.poll() is not None:
                    time.sleep(0.2)  # let the stderr reader catch up
                    raise RuntimeError(f"the local server exited (code {proc.returncode}):\n{''.join(stderr_tail)}")
                continue
            if line.startswith("CRYPTOGEN_LISTENING "):
                return proc, int(line.rsplit(":", 1)[1]), cert, token
        proc.kill()
        raise RuntimeError(f"the local server did not start within {settings.timeouts.startup_s:.0f} s")


class CryptoGenForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose forward pass is the CryptoGen two-party protocol.

    Use it where you would use ``AutoModelForCausalLM``::

        model = CryptoGenForCausalLM.from_pretrained("path/to/checkpoint")   # GPT-2 or LLaMA family, local server
        model = CryptoGenForCausalLM.from_pretrained(server="host:port")          # remote server
        out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=32)
    """

    config_class = CryptoGenModelConfig
    base_model_prefix = "cryptogen"
    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config, session: ClientSession | None = None):
        super().__init__(config)
        self.session = session
        self._server_process = None
        self._live_cache = None  # weak reference to the EncryptedCache of the session's conversation
        self._sample_temperature = None  # set during a sampled generate() with reveal: token
        # PreTrainedModel infers device and dtype from parameters; the client has
        # no weights, so it carries one placeholder.
        self._device_anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.post_init()

    # -- loading --------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, server: str | None = None, server_cert=None,
                        server_token: str | None = None, settings=None, **kwargs):
        """Connect to a secure server for this checkpoint.

        pretrained_model_name_or_path: an ordinary GPT-2 checkpoint folder. Without
            ``server``, a server process is started on loopback and loads the weights;
            this process reads only the public config.json.
        server: "host:port" of a running ``cryptogen serve``; the path is then optional.
        server_cert: with ``server``, the server's certificate or CA (PEM path or bytes)
            the connection must verify against (default: the system's CAs).
        server_token: with ``server``, this client's token (from the server's operator).
        settings: a cryptogen_hf config name, path or CryptoGenConfig (HE parameters,
            fixed point, dealer, timeouts); must match the server's.
        """
        settings = load_config(settings)
        # What AutoModelForCausalLM.from_pretrained passes along (hub options: nothing is downloaded).
        ignored = {"dtype", "torch_dtype", "device_map", "low_cpu_mem_usage", "trust_remote_code", "config",
                   "cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
                   "adapter_kwargs"}
        unused = set(kwargs) - ignored
        if kwargs.get("adapter_kwargs"):
            raise ValueError("adapters (PEFT) are not supported: merge the adapter into the checkpoint and serve that")
        if unused:
            raise TypeError(f"unsupported from_pretrained arguments for a secure model: {sorted(unused)}")
        handle = _read_secure_handle(pretrained_model_name_or_path)
        if handle is not None:  # a folder written by save_pretrained: where the model is served
            if server is None and handle.get("server"):
                server = handle["server"]
                server_cert = server_cert if server_cert is not None else handle.get("server_cert")
            pretrained_model_name_or_path = handle.get("checkpoint")
        proc = None
        if server is None:
            if pretrained_model_name_or_path is None:
                raise ValueError("give a checkpoint path (local server) or server='host:port'")
            if not Path(pretrained_model_name_or_path).exists():
                raise FileNotFoundError(
                    f"no checkpoint folder at {pretrained_model_name_or_path!r} (nothing is downloaded at run time)"
                )
            from ..protocol.session import he_params_from
            from ..families import family_for_config

            family_for_config(AutoConfig.from_pretrained(pretrained_model_name_or_path), he_params_from(settings).row_size)
            if server_cert is not None or server_token is not None:
                raise ValueError("server_cert and server_token are for a remote server (server='host:port'); "
                                 "a local server makes its own certificate and token")
            origin = {"checkpoint": str(Path(pretrained_model_name_or_path).resolve())}
            proc, port, server_cert, server_token = start_local_server(pretrained_model_name_or_path, settings)
            host = "127.0.0.1"
        else:
            host, _, port_text = server.rpartition(":")
            if not host or not port_text.isdigit():
                raise ValueError(f"server must be 'host:port', got {server!r}")
            port = int(port_text)
            origin = {"server": server, "server_cert": str(Path(server_cert).resolve()) if isinstance(server_cert, (str, Path)) else None}
        try:
            session = ClientSession(host, port, settings, server_cert=server_cert, token=server_token)
        except BaseException:
            if proc is not None:
                proc.kill()
            raise
        model = cls.from_session(session, origin, server_process=proc)
        atexit.register(model.close)
        return model

    @classmethod
    def from_session(cls, session, origin: dict | None = None, server_process=None) -> "CryptoGenForCausalLM":
        """The model on an open session (``from_pretrained`` opens one): the
        public config and generation defaults the handshake carried, and
        ``origin``, where the model is served (what ``save_pretrained`` writes).
        ``server_process``: a server started for this model alone (``start_local_server``),
        stopped by ``close``."""
        # Special token ids as the server's checkpoint has them (the handshake carries them).
        extra = {k: session.generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in session.generation}
        config = CryptoGenModelConfig(shape=session.shape.to_dict(), cryptogen=origin, **extra)
        model = cls(config, session)
        # The checkpoint's generation defaults (generation_config.json), as the server reads them.
        model.generation_config = GenerationConfig.from_dict(session.generation)
        model._server_process = server_process
        return model.eval()

    def save_pretrained(self, save_directory, **kwargs):
        """Write a folder that ``CryptoGenForCausalLM.from_pretrained`` and
        ``AutoModelForCausalLM.from_pretrained`` (after ``import cryptogen_hf``)
        load as this secure model: its config.json (model_type
        "cryptogen", the public shapes and where the model is served: the
        checkpoint folder of a local server, or the server's address and
        certificate) and generation_config.json. No weights (the client has
        none), no token, no keys: a remote server's token is passed again as
        ``server_token=``."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported: a secure model folder names a local checkpoint or a server")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)

    def close(self):
        """End the secure session and stop the local server, if this model started one."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._server_process is not None:
            # The local server serves only this model: stop it once the session is closed.
            self._server_process.terminate()
            try:
                self._server_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server_process.kill()
            self._server_process = None

    def prepare_correlations(self, tokens: int) -> bool:
        """Make the correlated randomness of the next `tokens` decode tokens now
        (call it while the user is idle: between two ``generate()`` calls), so
        those tokens run only the online protocol. See
        :meth:`ClientSession.prepare_correlations`."""
        if self.session is None:
            raise RuntimeError("this model's secure session is closed")
        return self.session.prepare_correlations(tokens)

    # -- generation hooks -----------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, *args, cache=None, **kwargs):
        # generate() runs input_ids[:, cache length:]. Given fewer tokens than
        # the cache holds (only the new ones, say), transformers would slice
        # from the wrong end and run tokens at the wrong positions: refuse.
        if cache is not None and input_ids.shape[1] <= cache.get_seq_length():
            raise ValueError(_no_new_tokens_message(cache.get_seq_length(), input_ids.shape[1]))
        return super().prepare_inputs_for_generation(input_ids, *args, cache=cache, **kwargs)

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        """Refuse, before any secure work and by name, every option the secure
        model cannot honour (transformers would otherwise run on and give
        silently wrong results or a misleading error)."""
        refusals = []
        if generation_config.use_cache is False:
            refusals.append("use_cache=False (the secure model always keeps its encrypted cache: each step runs only the "
                            "new token; remove use_cache=False)")
        if (generation_config.num_beams or 1) > 1:
            refusals.append(f"num_beams={generation_config.num_beams} (beam search needs several sequences at once; the "
                            "secure protocol runs one: use num_beams=1)")
        if (generation_config.num_return_sequences or 1) > 1:
            refusals.append(f"num_return_sequences={generation_config.num_return_sequences} (one sequence at a time: call "
                            "generate() once per sequence, with do_sample=True for different ones)")
        for option in ("output_attentions", "output_hidden_states"):
            if getattr(generation_config, option, False):
                refusals.append(f"{option}=True (attention weights and hidden states exist only as secret shares; "
                                "nobody can return them)")
        if refusals:
            raise ValueError("the secure model does not support " + "; ".join(refusals))
        if generation_mode == GenerationMode.ASSISTED_GENERATION and not self.session.config.generation.speculative_reveals_acceptance:
            raise ValueError(
                "speculative and prompt-lookup decoding (assistant_model=..., prompt_lookup_num_tokens=...) let the "
                "server learn how many drafted tokens each check accepted (it sees each pass's length and each crop "
                "of the encrypted cache): a few bits per check about how predictable your text is. To accept that, "
                "load the model with settings whose generation.speculative_reveals_acceptance is true"
            )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        # With reveal: token the token is drawn inside MPC, at this temperature
        # (the client sees no logits to sample from).
        self._sample_temperature = None
        if self._reveals_token() and generation_config.do_sample:
            self._sample_temperature = float(generation_config.temperature if generation_config.temperature is not None else 1.0)

    def _reveals_token(self) -> bool:
        return self.session is not None and self.session.config.mpc.reveal == "token"

    def _get_logits_processor(self, generation_config, *args, **kwargs):
        """With reveal: token the client never sees logits: refuse, by name, every
        logits processor but the temperature of a sampled generate() (applied inside MPC)."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if self._reveals_token():
            needing_logits = [p for p in processors if not (generation_config.do_sample and isinstance(p, TemperatureLogitsWarper))]
            if needing_logits:
                named = ", ".join(f"{type(p).__name__} (from {_PROCESSOR_OPTIONS.get(type(p).__name__, 'a generate() option')})"
                                  for p in needing_logits)
                raise ValueError(
                    f"with mpc.reveal: token the client sees no logits, so these cannot run: {named}. Turn them off "
                    "(top_k=0, top_p=1.0, bad_words_ids=None, ...: transformers' do_sample defaults to top_k=50, and a "
                    "checkpoint's generation_config.json may set others). Sampling then draws the token inside MPC from "
                    "the whole distribution at your temperature; for anything else use reveal: logits"
                )
        return processors

    def generate(self, *args, **kwargs):
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._sample_temperature = None

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get("cache")
        if cache is None:
            model_kwargs["cache"] = EncryptedCache(self)  # a generate() without a cache starts a new conversation
        elif not isinstance(cache, EncryptedCache):
            raise TypeError(f"CryptoGenForCausalLM needs an EncryptedCache, got {type(cache).__name__}")

    def get_output_embeddings(self):
        return None

    # -- the secure step ------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: EncryptedCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if self.session is None:
            raise RuntimeError("this secure model is closed")
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds would reveal activations to nobody but cannot be encrypted as token ids; pass input_ids")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids of shape (batch, tokens) are required")
        if input_ids.shape[0] != 1:
            raise ValueError(f"batch size {input_ids.shape[0]} is not supported: the secure protocol runs one sequence at a "
                             "time (pass one prompt per call; a pipeline needs batch_size=1)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding (zeros in attention_mask) is not supported with batch size 1; remove the padding")
        if cache is None:
            live = self._live_cache() if self._live_cache is not None else None
            if live is not None and live.get_seq_length():
                raise RuntimeError(
                    f"this model's EncryptedCache holds a conversation of {live.get_seq_length()} tokens that a call "
                    "without cache= would discard (the server keeps one cache per session): pass cache=... to "
                    "continue it, or call cache.reset() first to start over"
                )
            cache = EncryptedCache(self)  # a plain forward call: a fresh conversation, not kept
        if cache.get_seq_length() != self.session.n_tokens:
            raise RuntimeError(
                f"this EncryptedCache holds {cache.get_seq_length()} tokens but the server session has "
                f"{self.session.n_tokens}: a cache can only continue the session it was made in"
            )
        tokens = input_ids[0].tolist()
        n = len(tokens)
        if n == 0:
            raise ValueError(_no_new_tokens_message(cache.get_seq_length(), 0))
        keep = n if not logits_to_keep else min(int(logits_to_keep), n)
        logits_for = [i >= n - keep for i in range(n)]
        sample = {} if self._sample_temperature is None else {"temperature": self._sample_temperature}
        logits = self.session.forward(tokens, logits_for, **sample)
        cache._advance(n)
        logits = logits.to(torch.float32).unsqueeze(0)  # (1, keep, vocab)
        loss = None
        if labels is not None:
            if keep != n:
                raise ValueError("labels need logits for every position (logits_to_keep=0)")
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(torch.long))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def register_auto_classes() -> None:
    """Make the Auto classes know the secure model type (idempotent)."""
    try:
        AutoConfig.register(CryptoGenModelConfig.model_type, CryptoGenModelConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(CryptoGenModelConfig, CryptoGenForCausalLM)
    except ValueError:
        pass


register_auto_classes()
