"""Process configuration: every setting is an environment variable prefixed ``FALGATE_``."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """All of falgate's settings, with the defaults documented in the README."""

    model_config = SettingsConfigDict(
        env_prefix="FALGATE_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- serving -----------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".falgate")
    log_level: str = "info"
    log_prompts: bool = False
    public_url: str | None = None
    shutdown_grace_s: int = 25  # uvicorn timeout_graceful_shutdown; in-flight work drains
    # TLS for `falgate serve` (SPEC section 11): a certificate and key, or in sandbox mode a
    # development CA and certificate created in <data dir>/tls.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_self_signed: bool = False
    workers: int = Field(default=1, ge=1)  # server processes on one port (app/ops/workers.py)

    # --- state -------------------------------------------------------------
    redis_url: str | None = None
    redis_socket_timeout_s: float = 0.5
    # Generous enough for a burst that opens many pooled connections on a busy event loop; a
    # Redis that is down refuses connections at once, and a stalled one hits the read timeout.
    redis_connect_timeout_s: float = 2.0
    # Connections per process (per node on a cluster); a request waits up to
    # ``redis_pool_timeout_s`` for one instead of failing when all are busy.
    redis_max_connections: int = 256
    redis_pool_timeout_s: float = 2.0
    # The request path's scripts on one pipelined connection per process (single Redis over
    # TCP; app/metering/multiplex.py).
    redis_multiplex: bool = True

    # --- secrets -----------------------------------------------------------
    fal_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("FALGATE_FAL_KEY", "FAL_KEY")
    )
    admin_token: SecretStr | None = None

    # --- upstream ----------------------------------------------------------
    upstream_mode: Literal["queue", "sync"] = "queue"
    fal_run_url: str = "https://fal.run"
    fal_queue_url: str = "https://queue.fal.run"
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 60.0
    upstream_request_timeout_s: float = 300.0
    upstream_max_retries: int = 3
    upstream_retry_backoff_s: float = 0.25
    upstream_poll_interval_s: float = 0.1
    upstream_max_concurrent: int = 40
    upstream_queue_timeout_s: float = 30.0
    # issue 15: the HTTP client under httpx for fal calls (app/upstream/transport.py), and
    # whether queue mode follows fal's status stream (one call) instead of polling the status.
    upstream_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    upstream_status_stream: bool = True

    # --- sandbox -----------------------------------------------------------
    sandbox_url: str | None = None
    sandbox_host: str = "127.0.0.1"
    sandbox_port: int = 0
    sandbox_latency_ms: int = 300
    sandbox_public_url: str | None = None

    # --- request limits ----------------------------------------------------
    max_output_megapixels: Decimal = Decimal("4.2")
    max_output_megapixels_upscale: Decimal = Decimal("64")
    max_input_megapixels: Decimal = Decimal("16")
    max_input_bytes: int = 20_000_000
    max_body_bytes: int = 30_000_000
    image_fetch_allow_hosts: Annotated[list[str], NoDecode] = []
    # URL prefixes (scheme://host[:port]/path/) exempt from the private-address refusal; in
    # sandbox mode the sandbox's file route is added, and only that.
    image_fetch_allow_url_prefixes: Annotated[list[str], NoDecode] = []
    image_fetch_timeout_s: float = 10.0
    catalog_file: Path | None = None

    # --- metering and limits -----------------------------------------------
    default_rpm: int = 600
    default_max_concurrent: int = 16
    idempotency_ttl_s: int = 86_400
    auth_cache_ttl_s: float = 1.0
    sweeper_interval_s: float = 5.0
    process_lease_s: float = 15.0
    # A hold's lease, renewed while its request lives: a crashed process's holds are resolved
    # within a lease plus one sweep.
    hold_lease_s: float = 15.0
    # How long ``GET /v1/requests/{id}`` remembers a request.
    request_record_ttl_s: int = 7 * 86_400

    # --- ledger archive and reports (issue 12, SPEC section 13) ---------------
    ledger_database_url: str | None = None  # default: SQLite <data dir>/ledger.sqlite3
    ledger_redis_retention_h: float = 48.0
    ledger_drain_interval_s: float = 5.0  # 0 = no background drainer in this process
    ledger_drain_batch: int = 2000
    ledger_drain_lease_s: float = 30.0
    metrics_key_label: bool = False  # spend by key on /metrics (a label per key)
    # --- Sapiom control plane (SPEC section 12) -------------------------------
    sapiom_transaction_ttl_s: float = Field(default=300.0, gt=0, le=3600)

    # --- the HTTP edge (app/ops/edge.py, app/http.py) -------------------------
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=10.0, gt=0)
    body_deadline_s: float = Field(default=120.0, gt=0)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=1000, ge=1)

    @field_validator("image_fetch_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("image_fetch_allow_url_prefixes", mode="before")
    @classmethod
    def _split_prefixes(cls, value: object) -> object:
        if isinstance(value, str):
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    @property
    def sandbox_mode(self) -> bool:
        """No fal key configured: the upstream is the built-in fal emulator."""
        return self.fal_key is None or not self.fal_key.get_secret_value()

    @property
    def max_output_pixels(self) -> int:
        return int(self.max_output_megapixels * 1_000_000)

    @property
    def max_output_pixels_upscale(self) -> int:
        return int(self.max_output_megapixels_upscale * 1_000_000)

    @property
    def max_input_pixels(self) -> int:
        return int(self.max_input_megapixels * 1_000_000)


@lru_cache
def get_settings() -> Settings:
    return Settings()
