"""Issue tokens with the gateway's own settings: for the development key and tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import jwt

from gateway.auth.settings import AuthSettings


def mint_token(
    settings: AuthSettings,
    *,
    tenant: str,
    app: str | None = None,
    roles: Iterable[str] = ("user",),
    ttl_s: float = 3600,
    subject: str | None = None,
    key: Any = None,
    algorithm: str = "HS256",
    kid: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """Sign a token that ``Authenticator`` built from ``settings`` accepts.

    ``key`` defaults to the HMAC secret in ``settings`` (inline or file); pass
    a private key (PEM or a cryptography object) for RS*/ES*/EdDSA.
    ``extra_claims`` are applied last, so tests can override any claim.
    """
    if key is None:
        if settings.hs_secret is not None:
            key = settings.hs_secret
        elif settings.hs_secret_file is not None:
            key = settings.hs_secret_file.read_bytes().rstrip(b"\r\n")
        else:
            raise ValueError("no key given and no HMAC secret configured")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        "jti": uuid.uuid4().hex,
        settings.tenant_claim: tenant,
        settings.roles_claim: list(roles),
    }
    if app is not None:
        claims[settings.app_claim] = app
    if subject is not None:
        claims["sub"] = subject
    claims.update(extra_claims or {})
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
