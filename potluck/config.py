"""Settings: one object, layered flags > ``POTLUCK_*`` env vars > TOML config file > defaults.

The config file defaults to ``<platformdirs user_config_dir>/potluck/config.toml`` and holds the
same flat keys as the fields below (``port = 8642``, ``model = "/path/x.gguf"``). Layering is
pydantic-settings' source order (https://docs.pydantic.dev/latest/concepts/pydantic_settings/).
The settings object is built once by the CLI and passed down explicitly; nothing reads the
environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from potluck.errors import ConfigError

APP_NAME = "potluck"
DEFAULT_PORT = 8642


def default_config_file() -> Path:
    """Path of the default TOML config file (it need not exist)."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_data_dir() -> Path:
    """Directory for the node identity key and other persistent node state."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_cache_dir() -> Path:
    """Directory for downloaded and generated models."""
    return Path(platformdirs.user_cache_dir(APP_NAME))


class CloudPrice(BaseModel):
    """A cloud model's price per 1,000,000 tokens (``input``: prompt, ``output``: generated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)


#: A rank's memory budget when none is set, as a fraction of the RAM available.
DEFAULT_BUDGET_FRACTION = 0.8


def default_memory_budget() -> int:
    """A rank's memory budget when none is set: 80 % of the RAM available now, bytes."""
    import psutil

    return int(psutil.virtual_memory().available * DEFAULT_BUDGET_FRACTION)


class Settings(BaseSettings):
    """Every potluck setting. Field descriptions double as ``--help`` text."""

    model_config = SettingsConfigDict(env_prefix="POTLUCK_", extra="forbid", validate_default=True)

    # --- node / HTTP API ---------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="HTTP API port (0 picks a free one).")
    data_dir: Path = Field(default_factory=default_data_dir, description="Node key and state directory.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Model cache directory.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="Largest accepted HTTP request body, in bytes."
    )
    max_queue: int = Field(16, ge=0, le=4096, description="Requests allowed to wait for the model before HTTP 429.")
    default_max_tokens: int = Field(256, ge=1, le=1 << 20, description="max_tokens when a request omits it.")

    # --- client authentication (potluck.node.auth, potluck.node.keys) ------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys clients must send as 'Authorization: Bearer KEY', each 'KEY [scopes=cloud,"
        "privacy-override] [rate=60/min]' (env POTLUCK_API_KEYS: entries separated by ';').",
    )
    api_keys_file: Path | None = Field(
        None, description="File of API keys, one entry a line like api_keys; re-read when it changes (mode 0600)."
    )
    no_auth: bool = Field(False, description="Serve a non-loopback address without API keys (anyone may call).")
    api_rate_limit: str | None = Field(
        None,
        pattern=r"^\s*\d+(\.\d+)?\s*/\s*(s|sec|second|min|minute|h|hour)\s*$",
        description="Requests per key without its own rate=, e.g. 60/min (unset: unlimited).",
    )
    api_key: SecretStr | None = Field(
        None, description="Key the CLI (potluck chat/status/peers) sends to a node (env POTLUCK_API_KEY)."
    )

    # --- inference ------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="GGUF path, or Hugging Face 'owner/repo:file.gguf'. Unset: cached default or demo model.",
    )
    model_name: str | None = Field(None, description="Model id shown in the API (default: the file stem).")
    embedding_model: str | None = Field(
        None,
        description="GGUF (path or 'owner/repo:file.gguf') loaded for /v1/embeddings. Unset: no embeddings.",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description='Other names for served models, e.g. {"gpt-4o-mini": "SmolLM2-135M-Instruct"} '
        "(config table [aliases]; --alias NAME=MODEL adds to it).",
    )
    backend: Literal["llama.cpp", "onnxruntime"] = Field("llama.cpp", description="Inference backend.")
    n_ctx: int = Field(2048, ge=16, le=1 << 20, description="Context length in tokens (capped by the model).")
    n_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Compute threads (default: adaptive, the cores other processes leave free, checked each second).",
    )
    n_batch: int = Field(512, ge=1, le=1 << 16, description="Prompt-processing batch size in tokens.")
    parallel: int = Field(
        4,
        ge=1,
        le=64,
        description="Requests decoded together in one llama.cpp batch (slots; each gets n_ctx tokens of KV cache).",
    )

    # --- overlay --------------------------------------------------------------------------
    p2p_enabled: bool = Field(True, description="Join a swarm (libp2p host, discovery, cluster state).")
    p2p_host: str = Field("0.0.0.0", description="Address the libp2p host listens on (TCP).")
    p2p_port: int = Field(8643, ge=0, le=65535, description="libp2p TCP port (0 picks a free one).")
    bootstrap: list[str] = Field(
        default_factory=list, description="Multiaddrs (with /p2p/<peer ID>) of peers to join through."
    )
    swarm: str = Field("default", min_length=1, max_length=64, description="Swarm name; other swarms are refused.")
    swarm_secret: str | None = Field(
        None, min_length=8, max_length=256, description="Shared secret of a private swarm (HMAC admission)."
    )
    allowlist: list[str] = Field(default_factory=list, description="Peer IDs of your own devices (trust tier 1).")
    allowlist_only: bool = Field(False, description="Admit only peers on the allowlist.")
    lan_discovery: bool = Field(True, description="Find swarm peers on the LAN with zeroconf (mDNS).")
    dht_enabled: bool = Field(True, description="Kademlia DHT with provider records for served models.")
    state_interval_s: float = Field(
        5.0, gt=0, le=3600, description="Seconds between re-issues of this node's signed state record."
    )
    state_ttl_s: float = Field(
        30.0, gt=0, le=600, description="Lifetime of a state record; a silent peer leaves the view after it."
    )
    anti_entropy_interval_s: float = Field(
        15.0, gt=0, le=3600, description="Seconds between full-state syncs with connected peers."
    )
    serve_rate_limit_tps: float = Field(
        0.0, ge=0, le=1e6, description="Cap on tokens/s this node streams to swarm peers (0: no cap)."
    )
    serve_flush_interval_s: float = Field(
        0.005,
        ge=0,
        le=1.0,
        description="Most seconds a token streamed to a peer waits to share a frame with later ones (0: per event).",
    )

    verify_interval_s: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="Mean seconds between serving-quality checks of peers (challenges, Merkle proofs; "
        "jittered +-20%); 0: never check peers, only answer their challenges.",
    )

    # --- NAT traversal (overlay/nat) -----------------------------------------------------
    relay: bool = Field(False, description="Volunteer as a circuit relay v2 (hop) for peers behind NAT.")
    relay_max_reservations: int = Field(32, ge=1, le=4096, description="Relay: reservations held at once.")
    relay_reservation_ttl_s: int = Field(3600, ge=30, le=86400, description="Relay: reservation lifetime, s.")
    relay_max_circuits: int = Field(16, ge=1, le=4096, description="Relay: relayed connections at once.")
    relay_circuit_duration_s: int = Field(
        3600, ge=10, le=86400, description="Relay: longest a relayed connection may last, seconds."
    )
    relay_circuit_bytes: int = Field(
        1 << 30, ge=1 << 16, le=1 << 40, description="Relay: most bytes one relayed connection may carry."
    )
    nat_relays: int = Field(2, ge=0, le=8, description="Relays to hold reservations on while not reachable.")
    hole_punching: bool = Field(True, description="Upgrade relayed connections to direct ones (DCUtR).")
    autonat_confirmations: int = Field(
        2, ge=1, le=16, description="AutoNAT verdicts that must agree before reachability flips."
    )
    nat_check_interval_s: float = Field(60.0, gt=0, le=3600, description="Seconds between AutoNAT checks.")

    # --- tensor parallelism across the swarm (sharding/swarm) -------------------------------
    tensor_parallel: int = Field(
        0,
        ge=0,
        le=64,
        description="Serve the model tensor-parallel across N swarm nodes (N >= 2). 0: only when the "
        "model does not fit this node's memory_budget (or, without one, its free RAM), with N chosen by the "
        "cost model from the swarm's advertised bandwidths and budgets; 1: never.",
    )
    tp_worker: bool = Field(True, description="Accept tensor-parallel work (a shard of a peer's model).")
    tp_transport: Literal["auto", "tcp", "libp2p"] = Field(
        "auto", description="Star all-reduce path: direct TCP, libp2p streams, or TCP with libp2p fallback."
    )
    tp_timeout_s: float = Field(
        10.0, gt=0, le=600, description="All-reduce deadline: a dead or stalled TP worker is noticed within it."
    )
    tp_join_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Seconds to find TP workers and have them load their shards."
    )
    tp_max_sessions: int = Field(2, ge=1, le=64, description="Tensor-parallel sessions this node serves at once.")
    memory_budget: ByteSize = Field(
        ByteSize(0),
        description="Resident memory for a tensor-parallel rank's weights and KV cache (e.g. 2GiB): a rank "
        "whose share exceeds it keeps a sliding window of layers and streams the rest from disk. "
        "0: 80 % of the RAM available when the rank loads.",
    )

    @model_validator(mode="after")
    def _memory_budget_has_a_use(self) -> Settings:
        if self.memory_budget and self.tensor_parallel == 1 and not self.tp_worker:
            raise ValueError(
                "memory_budget limits tensor-parallel ranks, and this node runs none (tensor_parallel = 1 "
                "and tp_worker off): drop --memory-budget, or allow tensor parallelism"
            )
        return self

    def effective_memory_budget(self) -> int:
        """:attr:`memory_budget`, or :func:`default_memory_budget` when it is 0 (bytes)."""
        return int(self.memory_budget) or default_memory_budget()

    # --- privacy --------------------------------------------------------------------------
    privacy: Literal["strict", "standard", "off"] = Field(
        "standard",
        description="strict: sensitive requests stay on your devices; standard: sanitize before "
        "community peers and the cloud; off. Per request: X-Potluck-Privacy header.",
    )
    cloud_url: str | None = Field(
        None,
        description="OpenAI-compatible upstream base URL (e.g. https://host/v1); its models appear as cloud/<name>.",
    )
    cloud_model: list[str] = Field(
        default_factory=list, description="Upstream model names to offer (default: ask the upstream's /models)."
    )
    cloud_api_key: SecretStr | None = Field(
        None, description="Upstream API key (env POTLUCK_CLOUD_API_KEY); never logged."
    )
    cloud_connect_timeout_s: float = Field(10.0, gt=0, le=600, description="Upstream connect deadline, seconds.")
    cloud_read_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Longest silence inside an upstream stream, seconds."
    )
    cloud_total_timeout_s: float = Field(600.0, gt=0, le=86400, description="Upstream request deadline, seconds.")
    cloud_retries: int = Field(2, ge=0, le=10, description="Upstream retries before a stream starts.")
    cloud_prices: dict[str, CloudPrice] = Field(
        default_factory=dict,
        description='Per-token prices of cloud models per 1M tokens, e.g. [cloud_prices] "cloud/x" = '
        "{input = 0.15, output = 0.6} (a model without one is free).",
    )
    cloud_fallback: bool = Field(
        False,
        description="Cloud models are route candidates for requests naming any model (failover when the swarm fails).",
    )

    # --- routing (routing/: constraints, then score) --------------------------------------
    route_max_cost: float = Field(
        0.0, ge=0, description="Most predicted cost of one request (cloud_prices' currency); 0: no cap."
    )
    route_min_reputation: float = Field(
        0.0, ge=0, le=1, description="Peers whose reputation (0..1) is below this are not routed to."
    )
    route_cost_weight_s: float = Field(
        1000.0, ge=0, description="Seconds of predicted latency one unit of cost is worth when ranking routes."
    )

    @field_validator("cloud_prices")
    @classmethod
    def _cloud_price_names(cls, value: dict[str, CloudPrice]) -> dict[str, CloudPrice]:
        bad = [k for k in value if not k.startswith("cloud/")]
        if bad:
            raise ValueError(f"cloud_prices keys name cloud models as 'cloud/<name>', not {', '.join(bad)}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: Any) -> Any:
        """``POTLUCK_API_KEYS="k1 scopes=cloud; k2"`` -> two entries (a list passes unchanged)."""
        if isinstance(value, str):
            return [e.strip() for e in value.replace("\n", ";").split(";") if e.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build the settings from flags, environment, config file and defaults.

    Args:
        config_file: TOML file to read; ``None`` means :func:`default_config_file`. An explicitly
            given file must exist.
        **flags: values given on the command line; ``None`` values are ignored (flag not given).

    Raises:
        ConfigError: the file is missing or unreadable, or a value is out of bounds.
    """
    path = config_file if config_file is not None else default_config_file()
    if config_file is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FileSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid settings (flags, POTLUCK_* env or {path}):\n{exc}") from exc
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
