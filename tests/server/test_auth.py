"""API keys (CLI / file / env, constant-time compare) and JWT (HS256 / RS256) authentication."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from pagedserve.entrypoints.openai.errors import OpenAIError, install_exception_handlers
from pagedserve.ops import auth as auth_mod
from pagedserve.ops.auth import (
    AuthConfig,
    Authenticator,
    AuthMiddleware,
    Principal,
    auth_dependency,
    key_fingerprint,
    read_key_file,
)

AUD = "pagedserve-test"


def _pem_pair() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str, bytes]:
    private, public = _pem_pair()
    other_private, _ = _pem_pair()
    return private, public, other_private


def _claims(**over: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "alice", "aud": AUD, "exp": int(time.time()) + 600, "tenant": "acme"}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _fails(auth: Authenticator, header: str | None, fragment: str) -> None:
    with pytest.raises(OpenAIError) as info:
        auth.authenticate(header)
    assert info.value.status == 401 and info.value.type == "authentication_error"
    assert fragment in info.value.message
    assert info.value.headers.get("WWW-Authenticate") == "Bearer"


# ---------------------------------------------------------------------------- API keys


def test_anonymous_when_nothing_configured() -> None:
    auth = Authenticator(AuthConfig(), environ={})
    assert not auth.enabled
    p = auth.authenticate(None)
    assert p.kind == "anonymous" and p.tenant is None


def test_keys_from_cli_file_and_env(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(
        "# team keys\nfile-key-1 tenant-a\n\n  file-key-2   # trailing comment\nk1 tenant-b\n"
    )
    env = {"PAGEDSERVE_API_KEYS": "env-a, env-b", "VLLM_API_KEY": "vllm-key"}
    auth = Authenticator(AuthConfig(api_keys=["k1,k2", "k3"], api_key_file=str(key_file)), environ=env)
    assert auth.num_api_keys == 8  # k1 appears twice: merged, and the file's tenant is kept
    for key in ["k1", "k2", "k3", "file-key-1", "file-key-2", "env-a", "env-b", "vllm-key"]:
        p = auth.authenticate(f"Bearer {key}")
        assert p.kind == "api_key" and p.key_id == key_fingerprint(key)
        assert key not in p.key_id and len(p.key_id) == 12
    assert auth.authenticate("Bearer file-key-1").tenant == "tenant-a"
    assert auth.authenticate("bearer k1").tenant == "tenant-b"
    assert auth.authenticate("Bearer k2").tenant is None
    # use_env=False ignores the environment
    assert Authenticator(AuthConfig(api_keys=["x"], use_env=False), environ=env).num_api_keys == 1


def test_bad_keys_are_401() -> None:
    auth = Authenticator(AuthConfig(api_keys=["secret-key"]), environ={})
    _fails(auth, None, "Missing Authorization")
    _fails(auth, "", "Missing Authorization")
    _fails(auth, "Basic c2VjcmV0", "Bearer")
    _fails(auth, "Bearer", "Bearer")
    _fails(auth, "Bearer secret-ke", "Invalid API key")
    _fails(auth, "Bearer secret-key-and-more", "Invalid API key")


def test_every_key_is_compared_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [f"key-{i}" for i in range(7)]
    auth = Authenticator(AuthConfig(api_keys=keys), environ={})
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", counting)
    for presented in ["key-0", "key-6", "nope", "a-much-longer-token-than-any-key"]:
        calls.clear()
        try:
            auth.authenticate(f"Bearer {presented}")
        except OpenAIError:
            pass
        assert len(calls) == len(keys)  # no early exit on a match
        assert all(a == b == 32 for a, b in calls)  # digests: lengths never differ


def test_key_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("a b c\n")
    with pytest.raises(ValueError, match="line 1"):
        read_key_file(bad)
    with pytest.raises(FileNotFoundError):
        Authenticator(AuthConfig(api_key_file=str(tmp_path / "missing")), environ={})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="jwt_audience"):
        AuthConfig(jwt_secret="s")
    with pytest.raises(ValueError, match="leeway_s"):
        AuthConfig(leeway_s=-1)
    with pytest.raises(ValueError, match="jwt_public_key"):
        Authenticator(AuthConfig(jwt_public_key="/no/such.pem", jwt_audience=AUD), environ={})


# ---------------------------------------------------------------------------- JWT


def test_rs256_valid_token(rsa_keys: tuple[bytes, str, bytes], tmp_path: Path) -> None:
    private, public, _ = rsa_keys
    pem_file = tmp_path / "pub.pem"
    pem_file.write_text(public)
    for source in (public, str(pem_file)):  # PEM text or a path
        auth = Authenticator(AuthConfig(jwt_public_key=source, jwt_audience=AUD), environ={})
        token = jwt.encode(_claims(), private, algorithm="RS256")
        p = auth.authenticate(f"Bearer {token}")
        assert p == Principal(kind="jwt", tenant="acme", key_id=p.key_id, subject="alice")
        assert p.key_id.startswith("jwt-") and token not in p.key_id


# Tokens are built inside each test, never at collection time: a suite slower than a token's
# lifetime must not turn these cases into "expired" failures.
@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"exp": -60}, "expired"),  # relative to now, resolved in the test
        ({"aud": "someone-else"}, "audience"),
        ({"tenant": None}, "'tenant'"),
        ({"tenant": ""}, "'tenant'"),
        ({"exp": None}, "'exp'"),
        ({"aud": None}, "'aud'"),
    ],
)
def test_rs256_rejections(
    rsa_keys: tuple[bytes, str, bytes], overrides: dict[str, Any], fragment: str
) -> None:
    private, public, _ = rsa_keys
    auth = Authenticator(AuthConfig(jwt_public_key=public, jwt_audience=AUD), environ={})
    if isinstance(overrides.get("exp"), int):
        overrides = {**overrides, "exp": int(time.time()) + overrides["exp"]}
    _fails(auth, "Bearer " + jwt.encode(_claims(**overrides), private, algorithm="RS256"), fragment)


SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret"


def _hs(claims: dict[str, Any]) -> str:
    return "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")


def _hs_auth(**cfg: Any) -> Authenticator:
    return Authenticator(AuthConfig(jwt_secret=SECRET, jwt_audience=AUD, **cfg), environ={})


def test_time_claims_must_be_sane_numbers() -> None:
    auth = _hs_auth(jwt_max_lifetime_s=0)  # no lifetime limit: only the types and ranges are tested
    now = int(time.time())
    bad: list[tuple[dict[str, Any], str]] = [
        ({"exp": str(now + 600)}, "'exp' must be a number"),  # PyJWT alone accepts digit strings
        ({"exp": 10**20}, "'exp' is out of range"),  # ... and absurd values
        ({"exp": float("inf")}, "exp"),
        ({"exp": float("nan")}, "exp"),
        ({"exp": [now + 600]}, "exp"),
        ({"iat": str(now)}, "'iat' must be a number"),
        ({"iat": True}, "'iat' must be a number"),  # a bool is not a number here
        ({"iat": -5}, "'iat' is out of range"),
        ({"nbf": str(now - 10)}, "'nbf' must be a number"),
        ({"nbf": False}, "'nbf' must be a number"),
    ]
    for over, fragment in bad:
        _fails(auth, _hs(_claims(**over)), fragment)
    # Real numbers, ints or floats, are accepted.
    for over in ({}, {"exp": now + 600.5}, {"iat": now - 1.25, "nbf": now - 2}, {"exp": now + 10**9}):
        assert auth.authenticate(_hs(_claims(**over))).tenant == "acme"


def test_nbf_and_iat_not_after_exp() -> None:
    # Only reachable with leeway: PyJWT already refuses an iat / nbf in the future beyond it.
    auth = _hs_auth(leeway_s=120)
    now = int(time.time())
    _fails(auth, _hs(_claims(exp=now + 10, iat=now + 60)), "'iat' is after 'exp'")
    _fails(auth, _hs(_claims(exp=now + 10, nbf=now + 60)), "'nbf' is after 'exp'")


def test_max_lifetime() -> None:
    now = int(time.time())
    default = _hs_auth()  # 24 h
    assert AuthConfig().jwt_max_lifetime_s == 24 * 3600
    assert default.authenticate(_hs(_claims(iat=now, exp=now + 23 * 3600))).tenant == "acme"
    _fails(default, _hs(_claims(iat=now, exp=now + 25 * 3600)), "exceeds the 86400 s limit")
    _fails(default, _hs(_claims(exp=now + 25 * 3600)), "exp - now")  # no iat: measured from now
    # exp - iat counts even when the token has little time left: a 30-day token is refused.
    _fails(default, _hs(_claims(iat=now - 30 * 86400, exp=now + 60)), "exp - iat")
    short = _hs_auth(jwt_max_lifetime_s=600)
    assert short.authenticate(_hs(_claims(iat=now, exp=now + 600))).kind == "jwt"
    _fails(short, _hs(_claims(iat=now, exp=now + 601)), "lifetime")
    unlimited = _hs_auth(jwt_max_lifetime_s=0)
    assert unlimited.authenticate(_hs(_claims(iat=now, exp=now + 10 * 365 * 86400))).kind == "jwt"
    with pytest.raises(ValueError, match="jwt_max_lifetime_s"):
        AuthConfig(jwt_max_lifetime_s=-1)
    with pytest.raises(ValueError, match="jwt_max_lifetime_s"):
        AuthConfig(jwt_max_lifetime_s=float("inf"))


def test_rs256_wrong_signature(rsa_keys: tuple[bytes, str, bytes]) -> None:
    _, public, other_private = rsa_keys
    auth = Authenticator(AuthConfig(jwt_public_key=public, jwt_audience=AUD), environ={})
    _fails(auth, "Bearer " + jwt.encode(_claims(), other_private, algorithm="RS256"), "signature")
    token = jwt.encode(_claims(), rsa_keys[0], algorithm="RS256")
    head, body, sig = token.split(".")
    tampered_body = (
        base64.urlsafe_b64encode(json.dumps(_claims(tenant="evil")).encode()).rstrip(b"=").decode()
    )
    _fails(auth, f"Bearer {head}.{tampered_body}.{sig}", "signature")
    _fails(auth, "Bearer not.a.jwt", "malformed")


def test_public_key_as_hmac_secret_is_rejected(rsa_keys: tuple[bytes, str, bytes]) -> None:
    # The classic algorithm-confusion forgery: HS256 signed with the (public) RSA key as secret.
    _, public, _ = rsa_keys
    auth = Authenticator(AuthConfig(jwt_public_key=public, jwt_audience=AUD), environ={})

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(_claims()).encode())
    sig = hmac.new(public.encode(), signing_input.encode(), hashlib.sha256).digest()
    _fails(auth, f"Bearer {signing_input}.{b64(sig)}", "algorithm")


def test_hs256_issuer_and_custom_tenant_claim() -> None:
    cfg = AuthConfig(
        jwt_secret="s3cret-s3cret-s3cret-s3cret-s3cret",
        jwt_audience=AUD,
        jwt_issuer="idp",
        tenant_claim="org",
    )
    auth = Authenticator(cfg, environ={})
    secret = cfg.jwt_secret
    assert secret is not None
    good = jwt.encode(_claims(iss="idp", org="team-7"), secret, algorithm="HS256")
    assert auth.authenticate(f"Bearer {good}").tenant == "team-7"
    _fails(auth, "Bearer " + jwt.encode(_claims(iss="other", org="t"), secret, algorithm="HS256"), "issuer")
    _fails(auth, "Bearer " + jwt.encode(_claims(org="t"), secret, algorithm="HS256"), "'iss'")
    _fails(auth, "Bearer " + jwt.encode(_claims(iss="idp"), secret, algorithm="HS256"), "'org'")
    _fails(
        auth,
        "Bearer "
        + jwt.encode(_claims(iss="idp", org="t"), "wrong-secret-wrong-secret-wrong!", algorithm="HS256"),
        "signature",
    )


def test_keys_and_jwt_together(rsa_keys: tuple[bytes, str, bytes]) -> None:
    private, public, _ = rsa_keys
    auth = Authenticator(AuthConfig(api_keys=["plain"], jwt_public_key=public, jwt_audience=AUD), environ={})
    assert auth.authenticate("Bearer plain").kind == "api_key"
    assert auth.authenticate("Bearer " + jwt.encode(_claims(), private, algorithm="RS256")).kind == "jwt"
    _fails(auth, "Bearer plain2", "Invalid API key")


# ---------------------------------------------------------------------------- FastAPI


def _app(auth: Authenticator) -> FastAPI:
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        p: Principal = request.state.principal
        return {"kind": p.kind, "tenant": p.tenant}

    @app.get("/v1x")
    async def not_guarded() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/dep")
    async def dep(p: Principal = Depends(auth_dependency(auth))) -> dict[str, Any]:  # noqa: B008
        return {"kind": p.kind}

    app.add_middleware(AuthMiddleware, authenticator=auth)
    return app


def test_middleware_denies_by_default() -> None:
    auth = Authenticator(AuthConfig(api_keys=["k"]), environ={})
    client = TestClient(_app(auth))
    assert client.get("/health").status_code == 200
    assert client.get("/v1x").status_code == 401  # not on the public list: guarded
    assert client.get("/v1x", headers={"Authorization": "Bearer k"}).status_code == 200
    denied = client.get("/v1/models")
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == "Bearer"
    assert denied.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).json() == {
        "kind": "api_key",
        "tenant": None,
    }
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    assert client.options("/v1/models", headers=preflight).status_code != 401  # CORS preflight passes
    assert client.options("/v1/models").status_code == 401  # a bare OPTIONS is not a preflight
    assert client.get("/dep").status_code == 401
    assert client.get("/dep", headers={"Authorization": "Bearer k"}).json() == {"kind": "api_key"}
