"""Bearer token in, Principal out: the gateway's authentication step."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.auth.keys import KeyNotFoundError, KeyResolver
from gateway.auth.principal import Principal, Role
from gateway.auth.settings import AuthSettings
from gateway.errors import AuthenticationError

_KNOWN_ROLES: Mapping[str, Role] = {r.value: r for r in Role}


def _invalid(reason: str) -> AuthenticationError:
    return AuthenticationError(f"invalid token: {reason}", code="invalid_token")


# Verified tokens are remembered for at most this long, so a key withdrawn
# from the JWKS or the key files stops being honoured within a minute even for
# tokens it signed earlier.
VERIFIED_TTL_S = 60.0
VERIFIED_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    not_before: float
    """nbf minus leeway (or -inf)."""
    expires: float
    """exp plus leeway (or +inf)."""
    cached_until: float


class Authenticator:
    """Verifies ``Authorization: Bearer <jwt>`` headers against ``AuthSettings``.

    Every failure is an AuthenticationError (401): code ``missing_token`` when
    there is no bearer token at all, ``invalid_token`` otherwise, with a short
    reason that never repeats the token.
    """

    def __init__(self, settings: AuthSettings, key_resolver: KeyResolver) -> None:
        self._settings = settings
        self._keys = key_resolver
        self._require = tuple(dict.fromkeys(("iss", "aud", *settings.require_claims)))
        # Clients reuse one token for many requests; verifying its signature
        # each time is most of the cost of authentication. The key is the
        # exact token string whose signature was verified.
        self._verified: dict[str, _Verified] = {}

    async def authenticate(self, authorization_header: str | None) -> Principal:
        """Verify the header and return who is calling."""
        token = self._bearer_token(authorization_header)
        if len(token.encode()) > self._settings.max_token_bytes:
            raise _invalid("token is too large")
        now = time.time()
        hit = self._verified.get(token)
        if hit is not None:
            if now < hit.cached_until:
                if now >= hit.expires:
                    raise _invalid("token has expired")
                if now < hit.not_before:
                    raise _invalid("token is not yet valid")
                return hit.principal
            del self._verified[token]
        principal, claims = await self._verify(token)
        self._remember(token, principal, claims, now)
        return principal

    def _remember(
        self, token: str, principal: Principal, claims: Mapping[str, Any], now: float
    ) -> None:
        leeway = self._settings.leeway_s
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if len(self._verified) >= VERIFIED_MAX_ENTRIES:
            # Drop the oldest entry (dicts keep insertion order).
            del self._verified[next(iter(self._verified))]
        self._verified[token] = _Verified(
            principal,
            float(nbf) - leeway if isinstance(nbf, int | float) else float("-inf"),
            float(exp) + leeway if isinstance(exp, int | float) else float("inf"),
            now + VERIFIED_TTL_S,
        )

    async def _verify(self, token: str) -> tuple[Principal, dict[str, Any]]:
        settings = self._settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in settings.algorithms:
            raise _invalid("signing algorithm not accepted")
        try:
            keys = await self._keys.keys_for(header)
        except KeyNotFoundError as exc:
            raise _invalid(str(exc)) from None
        claims = self._decode(token, alg, keys)
        return self._principal(claims), claims

    @staticmethod
    def _bearer_token(authorization_header: str | None) -> str:
        if authorization_header is None or not authorization_header.strip():
            raise AuthenticationError("missing bearer token", code="missing_token")
        scheme, _, token = authorization_header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationError(
                "the Authorization header must use the Bearer scheme", code="missing_token"
            )
        token = token.strip()
        if not token:
            raise AuthenticationError("missing bearer token", code="missing_token")
        return token

    def _decode(self, token: str, alg: str, keys: tuple[Any, ...]) -> dict[str, Any]:
        settings = self._settings
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=settings.audience,
                    issuer=settings.issuer,
                    leeway=settings.leeway_s,
                    options={"require": list(self._require), "strict_aud": False},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise _invalid("token has expired") from None
            except jwt.ImmatureSignatureError:
                raise _invalid("token is not yet valid") from None
            except jwt.InvalidAudienceError:
                raise _invalid("wrong audience") from None
            except jwt.InvalidIssuerError:
                raise _invalid("wrong issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise _invalid(f"missing required claim {exc.claim!r}") from None
            except jwt.PyJWTError:
                raise _invalid("malformed token") from None
        raise _invalid("signature verification failed")

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        settings = self._settings
        tenant = claims.get(settings.tenant_claim)
        if not isinstance(tenant, str) or not tenant.strip():
            raise _invalid(f"missing or empty {settings.tenant_claim!r} claim")
        app = claims.get(settings.app_claim)
        if app is not None and (not isinstance(app, str) or not app.strip()):
            raise _invalid(f"{settings.app_claim!r} claim must be a non-empty string")
        subject = claims.get("sub")
        token_id = claims.get("jti")
        return Principal(
            tenant_id=tenant,
            app_id=app,
            subject=subject if isinstance(subject, str) else None,
            roles=self._roles(claims.get(settings.roles_claim)),
            token_id=token_id if isinstance(token_id, str) else None,
        )

    def _roles(self, raw: Any) -> frozenset[Role]:
        if raw is None:
            names: list[Any] = []
        elif isinstance(raw, str):
            names = raw.split()
        elif isinstance(raw, list):
            names = raw
        else:
            raise _invalid(f"{self._settings.roles_claim!r} claim must be a list or a string")
        # Unknown roles are ignored so issuers can share tokens with other services.
        roles = frozenset(
            _KNOWN_ROLES[n] for n in names if isinstance(n, str) and n in _KNOWN_ROLES
        )
        return roles or frozenset({Role.USER})
