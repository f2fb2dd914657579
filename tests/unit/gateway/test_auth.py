"""The authentication matrix: every way a token can be wrong is a 401 with its code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import ValidationError

from gateway.auth.guards import require_role
from gateway.auth.keys import KeyResolver
from gateway.auth.minting import mint_token
from gateway.auth.principal import Principal, Role
from gateway.auth.settings import AuthSettings
from gateway.auth.verifier import Authenticator
from gateway.errors import AuthenticationError, PermissionDeniedError
from gateway.policy.access import resolve_tenant
from gateway.policy.loader import load_policy

REPO = Path(__file__).resolve().parents[3]
SECRET = "s" * 32
LONG_SECRET = "L" * 64


def pem(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def hs_auth(**overrides: Any) -> tuple[AuthSettings, Authenticator]:
    settings = AuthSettings(hs_secret=SECRET, **overrides)
    return settings, Authenticator(settings, KeyResolver(settings))


async def assert_401(auth: Authenticator, header: str | None, code: str, reason: str = "") -> None:
    with pytest.raises(AuthenticationError) as info:
        await auth.authenticate(header)
    err = info.value
    assert err.status_code == 401
    assert err.code == code
    assert "www-authenticate" in err.headers
    assert reason in err.message
    if header is not None and len(header) > 20:
        # The token itself must never come back in the message.
        assert header.split()[-1] not in err.message


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], claims: dict[str, Any], signer: Any = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = signer(signing_input.encode()) if signer else b""
    return f"{signing_input}.{b64(signature)}"


def base_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": "tollgate-dev",
        "aud": "tollgate",
        "iat": now,
        "exp": now + 600,
        "tenant": "acme",
        **extra,
    }


# --- missing / malformed -----------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "   ", "Basic dXNlcjpwYXNz", "Bearer", "Bearer  "])
async def test_missing_or_non_bearer_is_missing_token(header: str | None) -> None:
    _, auth = hs_auth()
    await assert_401(auth, header, "missing_token")


async def test_missing_token_advertises_bearer_scheme() -> None:
    _, auth = hs_auth()
    with pytest.raises(AuthenticationError) as info:
        await auth.authenticate(None)
    assert info.value.headers["www-authenticate"].startswith("Bearer ")


async def test_garbage_token_is_invalid() -> None:
    _, auth = hs_auth()
    await assert_401(auth, "Bearer not.a.jwt-at-all", "invalid_token", "malformed")


async def test_happy_path_hs256_builds_principal() -> None:
    settings, auth = hs_auth()
    token = mint_token(
        settings, tenant="acme", app="support-bot", subject="u-1", roles=["user", "admin"]
    )
    principal = await auth.authenticate(f"bearer {token}")
    assert principal.tenant_id == "acme"
    assert principal.app_id == "support-bot"
    assert principal.subject == "u-1"
    assert principal.roles == frozenset({Role.USER, Role.ADMIN})
    assert principal.token_id is not None and len(principal.token_id) == 32


# --- time, issuer, audience ---------------------------------------------------


async def test_expired() -> None:
    settings, auth = hs_auth()
    token = mint_token(settings, tenant="acme", ttl_s=60, now=time.time() - 3600)
    await assert_401(auth, f"Bearer {token}", "invalid_token", "expired")


async def test_expired_within_leeway_is_accepted() -> None:
    settings, auth = hs_auth(leeway_s=30)
    token = mint_token(settings, tenant="acme", ttl_s=60, now=time.time() - 70)
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "acme"


async def test_not_yet_valid_nbf() -> None:
    settings, auth = hs_auth()
    token = mint_token(settings, tenant="acme", extra_claims={"nbf": int(time.time()) + 600})
    await assert_401(auth, f"Bearer {token}", "invalid_token", "not yet valid")


async def test_not_yet_valid_iat_in_future() -> None:
    settings, auth = hs_auth()
    token = mint_token(settings, tenant="acme", now=time.time() + 600)
    await assert_401(auth, f"Bearer {token}", "invalid_token", "not yet valid")


async def test_wrong_audience() -> None:
    settings, auth = hs_auth()
    token = mint_token(settings, tenant="acme", extra_claims={"aud": "someone-else"})
    await assert_401(auth, f"Bearer {token}", "invalid_token", "audience")


async def test_wrong_issuer() -> None:
    settings, auth = hs_auth()
    token = mint_token(settings, tenant="acme", extra_claims={"iss": "https://evil.example"})
    await assert_401(auth, f"Bearer {token}", "invalid_token", "issuer")


@pytest.mark.parametrize("claim", ["exp", "iat", "aud", "iss"])
async def test_required_claims(claim: str) -> None:
    _, auth = hs_auth()
    claims = base_claims()
    del claims[claim]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    await assert_401(auth, f"Bearer {token}", "invalid_token", claim)


# --- keys and algorithms --------------------------------------------------------


async def test_wrong_hmac_key() -> None:
    _, auth = hs_auth()
    token = jwt.encode(base_claims(), "x" * 32, algorithm="HS256")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "signature")


async def test_wrong_rsa_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    (tmp_path / "pub.pem").write_bytes(pem(rsa_key.public_key()))
    settings = AuthSettings(algorithms=["RS256"], public_key_files=[tmp_path / "pub.pem"])
    auth = Authenticator(settings, KeyResolver(settings))
    token = jwt.encode(base_claims(), other_rsa_key, algorithm="RS256")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "signature")


@pytest.mark.parametrize("alg_value", ["none", "None", "NONE"])
async def test_alg_none_is_refused(alg_value: str) -> None:
    _, auth = hs_auth(algorithms=["HS256", "RS256", "ES256", "EdDSA"])
    token = craft({"alg": alg_value, "typ": "JWT"}, base_claims())
    assert token.endswith(".")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "algorithm")


def test_settings_reject_none_algorithm() -> None:
    with pytest.raises(ValidationError, match="never an acceptable"):
        AuthSettings(algorithms=["HS256", "none"], hs_secret=SECRET)


def test_settings_reject_short_hmac_secret() -> None:
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        AuthSettings(hs_secret="short")
    with pytest.raises(ValidationError, match="at least 64 bytes"):
        AuthSettings(algorithms=["HS512"], hs_secret=SECRET)


async def test_algorithm_outside_allow_list() -> None:
    settings = AuthSettings(hs_secret=LONG_SECRET, algorithms=["HS256"])
    auth = Authenticator(settings, KeyResolver(settings))
    token = jwt.encode(base_claims(), LONG_SECRET, algorithm="HS512")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "algorithm")


async def test_hmac_signed_with_rsa_public_pem_fails(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    public_pem = pem(rsa_key.public_key())
    (tmp_path / "pub.pem").write_bytes(public_pem)
    settings = AuthSettings(
        algorithms=["RS256", "HS256"], hs_secret=SECRET, public_key_files=[tmp_path / "pub.pem"]
    )
    auth = Authenticator(settings, KeyResolver(settings))

    # The classic confusion attack: HS256 keyed with the public key's PEM text.
    def sign(data: bytes) -> bytes:
        return hmac.new(public_pem, data, hashlib.sha256).digest()

    forged = craft({"alg": "HS256", "typ": "JWT"}, base_claims(), sign)
    await assert_401(auth, f"Bearer {forged}", "invalid_token", "signature")

    # Without any HMAC secret the HS path has no key at all, still not the PEM.
    rsa_only = AuthSettings(algorithms=["RS256", "HS256"], public_key_files=[tmp_path / "pub.pem"])
    auth2 = Authenticator(rsa_only, KeyResolver(rsa_only))
    await assert_401(auth2, f"Bearer {forged}", "invalid_token", "no HMAC key")

    # And the genuine RS256 token still works, so the failures above are not vacuous.
    good = jwt.encode(base_claims(), rsa_key, algorithm="RS256")
    assert (await auth.authenticate(f"Bearer {good}")).tenant_id == "acme"


async def test_oversized_token(tmp_path: Path) -> None:
    settings, auth = hs_auth(max_token_bytes=1024)
    token = mint_token(settings, tenant="acme", extra_claims={"pad": "x" * 2000})
    await assert_401(auth, f"Bearer {token}", "invalid_token", "too large")
    # Size is checked before parsing: junk of that size is "too large", not "malformed".
    await assert_401(auth, "Bearer " + "A" * 5000, "invalid_token", "too large")


async def test_missing_tenant_claim() -> None:
    _, auth = hs_auth()
    claims = base_claims()
    del claims["tenant"]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "tenant")


@pytest.mark.parametrize("value", ["", "   ", 42, ["acme"]])
async def test_tenant_claim_must_be_non_empty_string(value: Any) -> None:
    _, auth = hs_auth()
    token = jwt.encode(base_claims(tenant=value), SECRET, algorithm="HS256")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "tenant")


async def test_custom_claim_names() -> None:
    _, auth = hs_auth(tenant_claim="org", app_claim="client", roles_claim="scope")
    token = jwt.encode(
        {**base_claims(), "org": "globex", "client": "cli", "scope": "finance openid"},
        SECRET,
        algorithm="HS256",
    )
    principal = await auth.authenticate(f"Bearer {token}")
    assert (principal.tenant_id, principal.app_id) == ("globex", "cli")
    assert principal.roles == frozenset({Role.FINANCE})


# --- asymmetric happy paths ----------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
async def test_rsa_happy_path(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    (tmp_path / "rsa.pem").write_bytes(pem(rsa_key.public_key()))
    settings = AuthSettings(algorithms=[alg], public_key_files=[tmp_path / "rsa.pem"])
    auth = Authenticator(settings, KeyResolver(settings))
    token = mint_token(settings, tenant="acme", key=rsa_key, algorithm=alg)
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "acme"


async def test_es256_happy_path_and_curve_check(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    (tmp_path / "ec.pem").write_bytes(pem(ec_key.public_key()))
    settings = AuthSettings(
        algorithms=["ES256", "ES384"], public_key_files={"ec1": tmp_path / "ec.pem"}
    )
    auth = Authenticator(settings, KeyResolver(settings))
    token = mint_token(settings, tenant="acme", key=ec_key, algorithm="ES256", kid="ec1")
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "acme"
    # A P-384 signature claimed against a P-256 key finds no key of that curve.
    p384 = ec.generate_private_key(ec.SECP384R1())
    bad = mint_token(settings, tenant="acme", key=p384, algorithm="ES384", kid="ec1")
    await assert_401(auth, f"Bearer {bad}", "invalid_token", "no key")


async def test_eddsa_happy_path(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    (tmp_path / "ed.pem").write_bytes(pem(ed_key.public_key()))
    settings = AuthSettings(algorithms=["EdDSA"], public_key_files=[tmp_path / "ed.pem"])
    auth = Authenticator(settings, KeyResolver(settings))
    token = mint_token(settings, tenant="globex", key=ed_key, algorithm="EdDSA")
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "globex"
    # An RSA-family token against the Ed25519 key: wrong family, refused.
    other = AuthSettings(algorithms=["EdDSA", "RS256"], public_key_files=[tmp_path / "ed.pem"])
    auth2 = Authenticator(other, KeyResolver(other))
    rs = jwt.encode(base_claims(), rsa.generate_private_key(65537, 2048), algorithm="RS256")
    await assert_401(auth2, f"Bearer {rs}", "invalid_token", "no key")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_hs384_hs512_happy_paths(alg: str) -> None:
    settings = AuthSettings(algorithms=[alg], hs_secret=LONG_SECRET)
    auth = Authenticator(settings, KeyResolver(settings))
    token = mint_token(settings, tenant="acme", algorithm=alg)
    assert jwt.get_unverified_header(token)["alg"] == alg
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "acme"


async def test_hs_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    settings = AuthSettings(hs_secret_file=tmp_path / "secret")
    auth = Authenticator(settings, KeyResolver(settings))
    token = mint_token(settings, tenant="acme")
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "acme"


# --- JWKS ----------------------------------------------------------------------


def jwk_of(private_key: Any, kid: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(private_key, rsa.RSAPrivateKey):
        entry: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    else:
        entry = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    entry["kid"] = kid
    return entry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """A tiny JWKS endpoint on 127.0.0.1 whose document tests can replace."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


async def test_jwks_url_rotation_and_rate_limit(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.document = {"keys": [jwk_of(rsa_key, "k1")]}
    settings = AuthSettings(
        algorithms=["RS256"], jwks_url=jwks_server.url, jwks_min_refresh_interval_s=30
    )
    clock = Clock()
    async with httpx.AsyncClient() as client:
        resolver = KeyResolver(settings, client, clock=clock)
        auth = Authenticator(settings, resolver)
        t1 = mint_token(settings, tenant="acme", key=rsa_key, algorithm="RS256", kid="k1")
        assert (await auth.authenticate(f"Bearer {t1}")).tenant_id == "acme"
        assert jwks_server.hits == 1

        # The issuer rotates in k2; a k2 token arrives after the interval: refetched.
        jwks_server.document = {"keys": [jwk_of(rsa_key, "k1"), jwk_of(other_rsa_key, "k2")]}
        clock.now += 31
        t2 = mint_token(settings, tenant="acme", key=other_rsa_key, algorithm="RS256", kid="k2")
        assert (await auth.authenticate(f"Bearer {t2}")).tenant_id == "acme"
        assert jwks_server.hits == 2

        # Another unknown kid within the interval: no refetch, a plain 401.
        clock.now += 5
        t3 = mint_token(settings, tenant="acme", key=other_rsa_key, algorithm="RS256", kid="k3")
        await assert_401(auth, f"Bearer {t3}", "invalid_token", "unknown key id")
        assert jwks_server.hits == 2
        # Known kids keep working without any fetch.
        assert (await auth.authenticate(f"Bearer {t1}")).tenant_id == "acme"
        assert jwks_server.hits == 2


async def test_jwks_unknown_kid_too_soon_after_rotation_is_refused_then_accepted(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.document = {"keys": [jwk_of(rsa_key, "k1")]}
    settings = AuthSettings(algorithms=["RS256"], jwks_url=jwks_server.url)
    clock = Clock()
    async with httpx.AsyncClient() as client:
        auth = Authenticator(settings, KeyResolver(settings, client, clock=clock))
        t1 = mint_token(settings, tenant="acme", key=rsa_key, algorithm="RS256", kid="k1")
        await auth.authenticate(f"Bearer {t1}")
        jwks_server.document = {"keys": [jwk_of(other_rsa_key, "k2")]}
        t2 = mint_token(settings, tenant="acme", key=other_rsa_key, algorithm="RS256", kid="k2")
        await assert_401(auth, f"Bearer {t2}", "invalid_token", "unknown key id")
        clock.now += 30
        assert (await auth.authenticate(f"Bearer {t2}")).tenant_id == "acme"
        assert jwks_server.hits == 2


async def test_jwks_file_rewritten_is_picked_up(
    tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(rsa_key, "old")]}))
    settings = AuthSettings(algorithms=["RS256", "EdDSA"], jwks_file=jwks)
    clock = Clock()
    resolver = KeyResolver(settings, clock=clock)
    auth = Authenticator(settings, resolver)
    token = mint_token(settings, tenant="acme", key=ed_key, algorithm="EdDSA", kid="new")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "unknown key id")
    jwks.write_text(json.dumps({"keys": [jwk_of(ed_key, "new")]}))
    clock.now += 60
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "acme"
    assert resolver.jwks_fetches == 2


async def test_jwks_failed_refresh_keeps_old_keys(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k1")]}))
    settings = AuthSettings(algorithms=["RS256"], jwks_file=jwks)
    clock = Clock()
    auth = Authenticator(settings, KeyResolver(settings, clock=clock))
    good = mint_token(settings, tenant="acme", key=rsa_key, algorithm="RS256", kid="k1")
    await auth.authenticate(f"Bearer {good}")
    jwks.write_text("{not json")
    clock.now += 60
    unknown = mint_token(settings, tenant="acme", key=rsa_key, algorithm="RS256", kid="zz")
    await assert_401(auth, f"Bearer {unknown}", "invalid_token")
    assert (await auth.authenticate(f"Bearer {good}")).tenant_id == "acme"


def test_jwks_url_needs_client() -> None:
    settings = AuthSettings(algorithms=["RS256"], jwks_url="http://127.0.0.1:1/jwks")
    with pytest.raises(ValueError, match="httpx"):
        KeyResolver(settings)


# --- roles, guards, tenants ----------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        (None, {Role.USER}),
        ([], {Role.USER}),
        (["admin"], {Role.ADMIN}),
        ("finance admin", {Role.FINANCE, Role.ADMIN}),
        (["user", "superuser", 7], {Role.USER}),
        ("root wizard", {Role.USER}),
    ],
)
async def test_role_parsing(claim: Any, expected: set[Role]) -> None:
    _, auth = hs_auth()
    claims = base_claims()
    if claim is not None:
        claims["roles"] = claim
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert (await auth.authenticate(f"Bearer {token}")).roles == frozenset(expected)


async def test_roles_of_wrong_type_are_invalid() -> None:
    _, auth = hs_auth()
    token = jwt.encode(base_claims(roles={"admin": True}), SECRET, algorithm="HS256")
    await assert_401(auth, f"Bearer {token}", "invalid_token", "roles")


def test_require_role() -> None:
    user = Principal(tenant_id="acme")
    admin = Principal(tenant_id="acme", roles=frozenset({Role.ADMIN}))
    require_role(admin, Role.ADMIN)
    require_role(admin, Role.FINANCE, Role.ADMIN)
    with pytest.raises(PermissionDeniedError) as info:
        require_role(user, Role.ADMIN, Role.FINANCE)
    assert info.value.status_code == 403
    assert "admin or finance" in info.value.message
    with pytest.raises(PermissionDeniedError):
        require_role(admin, Role.FINANCE)


def test_resolve_tenant() -> None:
    policy = load_policy(REPO / "tenants", REPO / "policies", environ={})
    assert resolve_tenant(policy, Principal(tenant_id="acme")).tenant_id == "acme"
    with pytest.raises(AuthenticationError) as unknown:
        resolve_tenant(policy, Principal(tenant_id="hooli"))
    assert (unknown.value.status_code, unknown.value.code) == (401, "unknown_tenant")
    with pytest.raises(PermissionDeniedError) as disabled:
        resolve_tenant(policy, Principal(tenant_id="initech"))
    assert (disabled.value.status_code, disabled.value.code) == (403, "tenant_disabled")


# --- settings from the environment ----------------------------------------------


def test_settings_from_env(tmp_path: Path) -> None:
    settings = AuthSettings.from_env(
        {
            "TOLLGATE_JWT_ALGORITHMS": "RS256, ES256",
            "TOLLGATE_JWT_PUBLIC_KEY_FILES": "a=/keys/a.pem,b=/keys/b.pem",
            "TOLLGATE_JWT_ISSUER": "https://issuer.example",
            "TOLLGATE_JWT_AUDIENCE": "gateway",
            "TOLLGATE_JWT_LEEWAY_S": "5",
            "TOLLGATE_JWT_MAX_TOKEN_BYTES": "4096",
            "TOLLGATE_JWT_REQUIRE_CLAIMS": "exp,iat,sub",
            "TOLLGATE_JWT_TENANT_CLAIM": "org",
            "TOLLGATE_JWT_JWKS_MIN_REFRESH_INTERVAL_S": "60",
            "UNRELATED": "x",
        }
    )
    assert settings.algorithms == ("RS256", "ES256")
    assert settings.public_key_files == {"a": Path("/keys/a.pem"), "b": Path("/keys/b.pem")}
    assert settings.issuer == "https://issuer.example"
    assert settings.audience == "gateway"
    assert settings.leeway_s == 5
    assert settings.max_token_bytes == 4096
    assert settings.require_claims == ("exp", "iat", "sub")
    assert settings.tenant_claim == "org"
    assert settings.jwks_min_refresh_interval_s == 60
    defaults = AuthSettings.from_env({})
    assert defaults == AuthSettings()
    assert defaults.algorithms == ("HS256",) and defaults.issuer == "tollgate-dev"
    with pytest.raises(ValidationError):
        AuthSettings.from_env({"TOLLGATE_JWT_ALGORITHMS": "none"})
    # The secret stays out of logs that print the settings.
    assert "p" * 40 not in repr(AuthSettings(hs_secret="p" * 40))


# --- the verified-token cache ---------------------------------------------------


async def test_a_cached_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    settings, auth = hs_auth(leeway_s=0)
    token = mint_token(settings, tenant="acme", ttl_s=5)
    assert (await auth.authenticate(f"Bearer {token}")).tenant_id == "acme"
    later = time.time() + 6
    monkeypatch.setattr(time, "time", lambda: later)
    await assert_401(auth, f"Bearer {token}", "invalid_token", "expired")


async def test_a_cached_token_is_not_reverified_until_its_entry_ages_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.auth import verifier

    settings, auth = hs_auth()
    token = mint_token(settings, tenant="acme", ttl_s=3600)
    calls = 0
    real_decode = auth._decode

    def counting_decode(*args: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return real_decode(*args)

    monkeypatch.setattr(auth, "_decode", counting_decode)
    for _ in range(5):
        await auth.authenticate(f"Bearer {token}")
    assert calls == 1
    later = time.time() + verifier.VERIFIED_TTL_S + 1
    monkeypatch.setattr(time, "time", lambda: later)
    await auth.authenticate(f"Bearer {token}")
    assert calls == 2


async def test_a_token_differing_by_one_character_is_verified_on_its_own() -> None:
    settings, auth = hs_auth()
    token = mint_token(settings, tenant="acme")
    await auth.authenticate(f"Bearer {token}")
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    await assert_401(auth, f"Bearer {tampered}", "invalid_token")
