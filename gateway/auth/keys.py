"""Which key verifies a token: the HMAC secret, a PEM public key, or a JWKS entry.

The key family follows the algorithm and nothing else: HS* tokens only ever
meet the HMAC secret, RS*/ES*/EdDSA tokens only ever meet public keys of the
matching type (and curve). That rule is what makes algorithm confusion
impossible: an attacker who signs an HS256 token with a public key's PEM text
as the secret finds no HMAC path that would accept it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import httpx
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.auth.settings import HMAC_ALGORITHMS, AuthSettings, check_hmac_secret

log = structlog.get_logger(__name__)

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
VerificationKey: TypeAlias = bytes | PublicKey

# A JWKS document bigger than this is not a key set anyone meant to publish.
MAX_JWKS_BYTES = 1_048_576

_EC_CURVES: Mapping[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
}


class KeyNotFoundError(Exception):
    """No configured key can verify this token (the message is safe to show)."""


@dataclass(frozen=True, slots=True)
class _PublishedKey:
    """One public key with where it applies: its kid, and its JWK ``alg`` if pinned."""

    key: PublicKey
    kid: str | None
    alg: str | None


def key_fits_algorithm(key: PublicKey, alg: str) -> bool:
    """Whether ``key`` is of the type (and curve) that algorithm ``alg`` uses."""
    if alg.startswith("RS"):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES[alg])
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def load_public_key_pem(data: bytes, source: str) -> PublicKey:
    """Parse one PEM public key, refusing key types no allowed algorithm uses."""
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"{source}: not a PEM public key") from exc
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise ValueError(f"{source}: unsupported public key type {type(key).__name__}")
    return key


def parse_jwks(document: Any) -> tuple[_PublishedKey, ...]:
    """Turn a JWKS document into public keys; entries we cannot use are skipped.

    Symmetric (``oct``) entries are skipped on purpose: HMAC keys only come
    from the gateway's own secret, never from a published document.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('a JWKS document is an object with a "keys" list')
    keys: list[_PublishedKey] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") == "oct":
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            log.warning("jwks_entry_skipped", kid=entry.get("kid"))
            continue
        key = jwk.key
        if not isinstance(
            key,
            rsa.RSAPublicKey
            | ec.EllipticCurvePublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ):
            # A private key in a public document is a publisher's mistake; skip it.
            continue
        kid = entry.get("kid")
        alg = entry.get("alg")
        keys.append(
            _PublishedKey(
                key=key,
                kid=kid if isinstance(kid, str) else None,
                alg=alg if isinstance(alg, str) else None,
            )
        )
    return tuple(keys)


class KeyResolver:
    """Finds the verification keys for a token header (``alg``, ``kid``).

    Static keys (HMAC secret, PEM files) are read once, at construction. A
    JWKS document (file or URL) is read on first use and re-read when a token
    names a ``kid`` it does not hold, at most once per
    ``settings.jwks_min_refresh_interval_s``; a failed refresh keeps the keys
    already held.
    """

    def __init__(
        self,
        settings: AuthSettings,
        http_client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.jwks_url is not None and http_client is None:
            raise ValueError("jwks_url needs the shared httpx.AsyncClient")
        self._settings = settings
        self._http = http_client
        self._clock = clock
        self._hmac_secret = self._load_hmac_secret(settings)
        self._static_keys = self._load_public_keys(settings)
        self._jwks: tuple[_PublishedKey, ...] = ()
        self._jwks_fetched_at: float | None = None
        self._jwks_lock = asyncio.Lock()
        self.jwks_fetches = 0
        """How many times the JWKS document was read (for metrics and tests)."""

    @staticmethod
    def _load_hmac_secret(settings: AuthSettings) -> bytes | None:
        if settings.hs_secret is not None:
            return settings.hs_secret.encode()
        if settings.hs_secret_file is not None:
            # Files written by editors and secret managers often end in a newline
            # that nobody means as part of the key.
            secret = settings.hs_secret_file.read_bytes().rstrip(b"\r\n")
            check_hmac_secret(secret, settings.algorithms)
            return secret
        return None

    @staticmethod
    def _load_public_keys(settings: AuthSettings) -> tuple[_PublishedKey, ...]:
        files = settings.public_key_files
        entries: list[tuple[str | None, Path]] = (
            list(files.items()) if isinstance(files, dict) else [(None, p) for p in files]
        )
        return tuple(
            _PublishedKey(key=load_public_key_pem(path.read_bytes(), str(path)), kid=kid, alg=None)
            for kid, path in entries
        )

    @property
    def has_jwks(self) -> bool:
        """Whether a JWKS source is configured."""
        return self._settings.jwks_file is not None or self._settings.jwks_url is not None

    async def keys_for(self, header: Mapping[str, Any]) -> tuple[VerificationKey, ...]:
        """The keys to try, in order, for a token with this (unverified) header.

        Raises KeyNotFoundError when there are none. The caller has already
        checked ``alg`` against the allow-list.
        """
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise KeyNotFoundError("token header has no algorithm")
        if alg in HMAC_ALGORITHMS:
            if self._hmac_secret is None:
                raise KeyNotFoundError("no HMAC key is configured")
            return (self._hmac_secret,)
        raw_kid = header.get("kid")
        if raw_kid is not None and not isinstance(raw_kid, str):
            raise KeyNotFoundError("token header kid is not a string")
        kid: str | None = raw_kid

        if self.has_jwks and (
            self._jwks_fetched_at is None or (kid is not None and not self._knows_kid(kid))
        ):
            await self._refresh_jwks()
        found = self._matching(alg, kid)
        if not found:
            if kid is not None and not self._knows_kid(kid):
                raise KeyNotFoundError("unknown key id")
            raise KeyNotFoundError(f"no key for algorithm {alg}")
        return found

    def _knows_kid(self, kid: str) -> bool:
        return any(k.kid == kid for k in (*self._static_keys, *self._jwks))

    def _matching(self, alg: str, kid: str | None) -> tuple[VerificationKey, ...]:
        keys = (*self._static_keys, *self._jwks)
        if kid is not None:
            # A token that names a known key gets that key or nothing. A kid we
            # do not know may still match the unkeyed PEM files: issuers often
            # stamp a kid the operator never configured.
            keyed = tuple(k for k in keys if k.kid == kid)
            keys = keyed or tuple(k for k in self._static_keys if k.kid is None)
        return tuple(
            k.key
            for k in keys
            if key_fits_algorithm(k.key, alg) and (k.alg is None or k.alg == alg)
        )

    async def _refresh_jwks(self) -> None:
        async with self._jwks_lock:
            now = self._clock()
            last = self._jwks_fetched_at
            # Tokens with made-up kids are cheap to send; without this limit each
            # one would cost the issuer a fetch. Requests that queued on the lock
            # behind a fetch also land here and reuse its result.
            if last is not None and now - last < self._settings.jwks_min_refresh_interval_s:
                return
            self._jwks_fetched_at = now
            self.jwks_fetches += 1
            try:
                document = await self._read_jwks()
                self._jwks = parse_jwks(document)
            except (OSError, ValueError, httpx.HTTPError) as exc:
                # Keep the keys we had: an issuer outage must not log everyone out.
                log.warning("jwks_refresh_failed", error=str(exc), kept=len(self._jwks))
            else:
                log.info("jwks_refreshed", keys=len(self._jwks))

    async def _read_jwks(self) -> Any:
        settings = self._settings
        if settings.jwks_file is not None:
            raw = await asyncio.to_thread(settings.jwks_file.read_bytes)
        else:
            assert self._http is not None and settings.jwks_url is not None
            response = await self._http.get(
                settings.jwks_url, headers={"accept": "application/json"}, timeout=5.0
            )
            response.raise_for_status()
            raw = response.content
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError("JWKS document is too large")
        return json.loads(raw)
