"""Gateway settings: one frozen object, built from the environment or the CLI."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.auth.settings import AuthSettings

DEV_SECRET_ENV = "TOLLGATE_DEV_SECRET_FILE"


class GatewaySettings(BaseModel):
    """Everything `create_app` needs.

    Environment variables (all optional): `TOLLGATE_HOST`, `TOLLGATE_PORT`,
    `TOLLGATE_TENANTS_DIR`, `TOLLGATE_POLICIES_DIR`, `TOLLGATE_MAX_BODY_BYTES`,
    `TOLLGATE_POLICY_POLL_S`, `TOLLGATE_LOG_LEVEL`, `TOLLGATE_WORKERS`, the
    quota store's `TOLLGATE_STORE`, `TOLLGATE_REDIS_URL`,
    `TOLLGATE_REDIS_TIMEOUT_S`, `TOLLGATE_QUOTA_LEASE_TTL_S`,
    `TOLLGATE_QUOTA_BREAKER_FAILURES`, `TOLLGATE_QUOTA_BREAKER_RESET_S`, the
    usage ledger's `TOLLGATE_LEDGER_DIR`, `TOLLGATE_LEDGER_DRAIN_INTERVAL_S`,
    `TOLLGATE_LEDGER_RETENTION_DAYS`, `TOLLGATE_LEDGER_DRAINER`,
    `TOLLGATE_LEDGER_CHARGE_UNKNOWN`, `TOLLGATE_LEDGER_LOCK_TTL_S` (docs/ledger.md), tracing's
    `TOLLGATE_OTEL_ENDPOINT` (or the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
    `OTEL_EXPORTER_OTLP_ENDPOINT`; docs/metrics.md), plus the `TOLLGATE_JWT_*` family read
    by `AuthSettings.from_env`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tenants_dir: Path = Path("tenants")
    policies_dir: Path = Path("policies")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    policy_poll_s: float = Field(default=0.5, gt=0)
    log_level: str = "info"
    workers: int = Field(default=1, ge=1, le=256)
    store: Literal["memory", "redis"] = "memory"
    """Where quotas are counted: this process (`memory`) or Redis (shared)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(default=1.0, gt=0, le=30)
    """Socket connect and read timeout for the quota store; a call is abandoned
    after twice this, and counts towards opening the circuit breaker."""
    quota_lease_ttl_s: float = Field(default=60.0, gt=0)
    """How long a reservation outlives a gateway that died holding it."""
    quota_breaker_failures: int = Field(default=3, ge=1)
    quota_breaker_reset_s: float = Field(default=1.0, gt=0)
    # --- usage ledger (docs/ledger.md) ---
    ledger_dir: Path = Field(default_factory=lambda: default_ledger_dir())
    """Root of the day-partitioned Parquet ledger."""
    ledger_drain_interval_s: float = Field(default=5.0, gt=0)
    """How often the drainer moves records from the store into the ledger."""
    ledger_retention_days: int = Field(default=0, ge=0)
    """Day partitions older than this are deleted by the drainer; 0 keeps all."""
    ledger_drainer: bool = True
    """Run a drainer in this process (one drains at a time across replicas);
    off when `tollgate usage drain` runs on its own."""
    ledger_charge_unknown: Literal["reserved", "prompt", "none"] = "reserved"
    """What a record charges when the backend's usage never came back."""
    ledger_lock_ttl_s: float = Field(default=30.0, gt=0)
    """How long the active drainer's lock outlives it (Redis); longer than a
    batch takes to write."""
    # --- end usage ledger ---
    otel_endpoint: str | None = None
    """OTLP/HTTP traces URL; None: tracing off (docs/metrics.md)."""
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @model_validator(mode="after")
    def _memory_store_is_one_process(self) -> GatewaySettings:
        if self.store == "memory" and self.workers > 1:
            raise ValueError(
                "the memory quota store counts in one process only: with "
                f"{self.workers} workers each would allow the full limit; "
                "set TOLLGATE_STORE=redis (and TOLLGATE_REDIS_URL) or TOLLGATE_WORKERS=1"
            )
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        """Read `TOLLGATE_*` variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        names = {
            "TOLLGATE_HOST": "host",
            "TOLLGATE_PORT": "port",
            "TOLLGATE_TENANTS_DIR": "tenants_dir",
            "TOLLGATE_POLICIES_DIR": "policies_dir",
            "TOLLGATE_MAX_BODY_BYTES": "max_body_bytes",
            "TOLLGATE_POLICY_POLL_S": "policy_poll_s",
            "TOLLGATE_LOG_LEVEL": "log_level",
            "TOLLGATE_WORKERS": "workers",
            "TOLLGATE_STORE": "store",
            "TOLLGATE_REDIS_URL": "redis_url",
            "TOLLGATE_REDIS_TIMEOUT_S": "redis_timeout_s",
            "TOLLGATE_QUOTA_LEASE_TTL_S": "quota_lease_ttl_s",
            "TOLLGATE_QUOTA_BREAKER_FAILURES": "quota_breaker_failures",
            "TOLLGATE_QUOTA_BREAKER_RESET_S": "quota_breaker_reset_s",
            "TOLLGATE_LEDGER_DIR": "ledger_dir",
            "TOLLGATE_LEDGER_DRAIN_INTERVAL_S": "ledger_drain_interval_s",
            "TOLLGATE_LEDGER_RETENTION_DAYS": "ledger_retention_days",
            "TOLLGATE_LEDGER_DRAINER": "ledger_drainer",
            "TOLLGATE_LEDGER_CHARGE_UNKNOWN": "ledger_charge_unknown",
            "TOLLGATE_LEDGER_LOCK_TTL_S": "ledger_lock_ttl_s",
        }
        values: dict[str, object] = {f: env[k] for k, f in names.items() if env.get(k)}
        values["otel_endpoint"] = otel_endpoint_from(env)
        values["auth"] = AuthSettings.from_env(env)
        return cls.model_validate(values)


def otel_endpoint_from(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL: `TOLLGATE_OTEL_ENDPOINT`, else the standard
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`
    with the traces path appended (as the OpenTelemetry spec does); None when
    none is set, or when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    explicit = env.get("TOLLGATE_OTEL_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if explicit:
        return explicit
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + "/v1/traces"
    return None


def default_ledger_dir() -> Path:
    """`$XDG_DATA_HOME/tollgate/ledger` (`~/.local/share/tollgate/ledger`)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "tollgate" / "ledger"


def dev_secret_path() -> Path:
    """Where the development HMAC key lives: `$TOLLGATE_DEV_SECRET_FILE`, else
    `$XDG_CONFIG_HOME/tollgate/dev-jwt-secret`."""
    explicit = os.environ.get(DEV_SECRET_ENV)
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tollgate" / "dev-jwt-secret"


def ensure_dev_secret() -> Path:
    """Create the development key once (random, mode 0600) and return its path.

    A random per-machine key, not a constant in the source: a development
    gateway that is exposed by mistake still cannot be called with a token
    minted from public knowledge.
    """
    path = dev_secret_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        os.replace(tmp, path)
    return path
