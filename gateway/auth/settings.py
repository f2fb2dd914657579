"""How the gateway verifies JWTs: one frozen settings object, buildable from env."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"]
"""The signature algorithms the gateway can be told to accept."""

SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(get_args(Algorithm))

HMAC_ALGORITHMS: frozenset[str] = frozenset({"HS256", "HS384", "HS512"})

# RFC 7518 section 3.2: an HMAC key must be at least as long as the hash output.
HMAC_MIN_KEY_BYTES: Mapping[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}

ENV_PREFIX = "TOLLGATE_JWT_"


class AuthSettings(BaseModel):
    """Token verification settings.

    Keys come from at most three places: an HMAC secret (``hs_secret`` or
    ``hs_secret_file``; only ever used for HS* tokens), PEM public keys
    (``public_key_files``: a list, or a mapping from ``kid`` to file), and a
    JWKS document (``jwks_file`` or ``jwks_url``), which is re-read when a
    token names an unknown ``kid`` but at most once per
    ``jwks_min_refresh_interval_s``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithms: tuple[Algorithm, ...] = ("HS256",)
    hs_secret: str | None = Field(default=None, repr=False)
    hs_secret_file: Path | None = None
    public_key_files: tuple[Path, ...] | dict[str, Path] = ()
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_min_refresh_interval_s: float = Field(default=30.0, ge=0)
    issuer: str = Field(default="tollgate-dev", min_length=1)
    audience: str = Field(default="tollgate", min_length=1)
    leeway_s: float = Field(default=30.0, ge=0, le=600)
    max_token_bytes: int = Field(default=8192, ge=256, le=1_048_576)
    require_claims: tuple[str, ...] = ("exp", "iat")
    tenant_claim: str = Field(default="tenant", min_length=1)
    app_claim: str = Field(default="app", min_length=1)
    roles_claim: str = Field(default="roles", min_length=1)

    @field_validator("algorithms", mode="before")
    @classmethod
    def _reject_unknown_algorithms(cls, value: Any) -> Any:
        # Checked before the Literal so "none" gets a message that says why.
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            for alg in value:
                if isinstance(alg, str) and alg.lower() == "none":
                    raise ValueError('"none" is never an acceptable JWT algorithm')
                if alg not in SUPPORTED_ALGORITHMS:
                    allowed = ", ".join(sorted(SUPPORTED_ALGORITHMS))
                    raise ValueError(f"unsupported JWT algorithm {alg!r} (allowed: {allowed})")
        return value

    @field_validator("algorithms")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm must be allowed")
        return tuple(dict.fromkeys(value))

    @field_validator("jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("jwks_url must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _consistent_keys(self) -> AuthSettings:
        if self.hs_secret is not None and self.hs_secret_file is not None:
            raise ValueError("set hs_secret or hs_secret_file, not both")
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError("set jwks_file or jwks_url, not both")
        if self.hs_secret is not None:
            check_hmac_secret(self.hs_secret.encode(), self.algorithms)
        return self

    @property
    def hmac_algorithms(self) -> tuple[str, ...]:
        """The allowed algorithms that verify with the HMAC secret."""
        return tuple(a for a in self.algorithms if a in HMAC_ALGORITHMS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AuthSettings:
        """Build settings from ``TOLLGATE_JWT_*`` variables; unset ones keep defaults.

        - ``TOLLGATE_JWT_ALGORITHMS``: comma-separated allow-list, e.g. ``RS256,ES256``.
        - ``TOLLGATE_JWT_HS_SECRET``: the HMAC secret (at least 32 bytes for HS256,
          48 for HS384, 64 for HS512).
        - ``TOLLGATE_JWT_HS_SECRET_FILE``: a file holding the HMAC secret instead.
        - ``TOLLGATE_JWT_PUBLIC_KEY_FILES``: comma-separated PEM public key files;
          each entry may be ``kid=path`` to bind the key to a ``kid`` (all entries
          then need a kid).
        - ``TOLLGATE_JWT_JWKS_FILE``: path of a JWKS JSON document.
        - ``TOLLGATE_JWT_JWKS_URL``: URL of a JWKS JSON document.
        - ``TOLLGATE_JWT_JWKS_MIN_REFRESH_INTERVAL_S``: seconds between JWKS refreshes.
        - ``TOLLGATE_JWT_ISSUER``: the required ``iss``.
        - ``TOLLGATE_JWT_AUDIENCE``: the required ``aud``.
        - ``TOLLGATE_JWT_LEEWAY_S``: clock skew allowed on exp/nbf/iat, in seconds.
        - ``TOLLGATE_JWT_MAX_TOKEN_BYTES``: larger tokens are refused unread.
        - ``TOLLGATE_JWT_REQUIRE_CLAIMS``: comma-separated claims that must be present.
        - ``TOLLGATE_JWT_TENANT_CLAIM``, ``TOLLGATE_JWT_APP_CLAIM``,
          ``TOLLGATE_JWT_ROLES_CLAIM``: the claim names carrying tenant, app and roles.

        Raises ValueError (``pydantic.ValidationError`` for field values) on a bad value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def get(name: str) -> str | None:
            raw = env.get(ENV_PREFIX + name)
            return raw.strip() if raw is not None and raw.strip() else None

        def split(raw: str) -> list[str]:
            return [item.strip() for item in raw.split(",") if item.strip()]

        if (raw := get("ALGORITHMS")) is not None:
            values["algorithms"] = split(raw)
        if (raw := env.get(ENV_PREFIX + "HS_SECRET")) is not None and raw != "":
            # A secret is used byte for byte: no stripping.
            values["hs_secret"] = raw
        if (raw := get("PUBLIC_KEY_FILES")) is not None:
            entries = split(raw)
            if entries and all("=" in e for e in entries):
                values["public_key_files"] = {
                    kid.strip(): Path(path.strip())
                    for kid, path in (e.split("=", 1) for e in entries)
                }
            elif any("=" in e for e in entries):
                raise ValueError(
                    f"{ENV_PREFIX}PUBLIC_KEY_FILES: use kid=path for every entry or for none"
                )
            else:
                values["public_key_files"] = tuple(Path(e) for e in entries)
        if (raw := get("REQUIRE_CLAIMS")) is not None:
            values["require_claims"] = split(raw)
        plain = {
            "HS_SECRET_FILE": "hs_secret_file",
            "JWKS_FILE": "jwks_file",
            "JWKS_URL": "jwks_url",
            "JWKS_MIN_REFRESH_INTERVAL_S": "jwks_min_refresh_interval_s",
            "ISSUER": "issuer",
            "AUDIENCE": "audience",
            "LEEWAY_S": "leeway_s",
            "MAX_TOKEN_BYTES": "max_token_bytes",
            "TENANT_CLAIM": "tenant_claim",
            "APP_CLAIM": "app_claim",
            "ROLES_CLAIM": "roles_claim",
        }
        for suffix, field in plain.items():
            if (raw := get(suffix)) is not None:
                values[field] = raw
        return cls.model_validate(values)


def check_hmac_secret(secret: bytes, algorithms: tuple[str, ...]) -> None:
    """Raise ValueError when ``secret`` is too short for an allowed HMAC algorithm."""
    needed = max((HMAC_MIN_KEY_BYTES[a] for a in algorithms if a in HMAC_MIN_KEY_BYTES), default=0)
    if needed and len(secret) < needed:
        raise ValueError(
            f"the HMAC secret must be at least {needed} bytes for the allowed algorithms"
            f" (got {len(secret)})"
        )
