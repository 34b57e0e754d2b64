"""Authentication: static API keys and JWT bearer tokens.

Sources of API keys (all merged): `--api-key` values (repeatable, each may be a comma list), a key
file (one key per line, optionally followed by a tenant name and the tenant's policy as
`name=value` fields, read by ops/tenants.py; `#` starts a comment), and the environment (`PAGEDSERVE_API_KEYS`, comma-separated, and vLLM's `VLLM_API_KEY`).

Key comparison is constant-time: the presented token and every stored key are reduced to SHA-256
digests (equal lengths, so compare_digest leaks no length), and the token is compared against ALL
keys with no early exit, so response time does not tell how many keys exist or which one matched.

JWTs (PyJWT): HS256 with a shared secret and/or RS256 with a PEM public key; `exp` is required,
`aud` must match the configured audience, `iss` too when configured. The tenant comes from a
configurable claim (default "tenant"); a token without it is rejected. With `policy_claim` set, that
claim (an object) is the tenant policy the issuer grants (ops/tenants.py reads it). The time claims `exp`,
`nbf`, `iat` must be JSON numbers (not strings, not booleans), finite and within [0, MAX_NUMERIC_DATE]
(PyJWT alone would take `"exp": "1999999999"` and `"exp": 1e20`), and a token may not live longer
than `jwt_max_lifetime_s` (exp - iat, or exp - now when there is no iat; default 24 h, 0 = no limit),
so a leaked long-lived token cannot be replayed for years.

No credentials are configured -> every request is anonymous (vLLM's behaviour without --api-key).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt
from fastapi import Request

from pagedserve.entrypoints.openai.errors import AuthenticationError

PrincipalKind = Literal["api_key", "jwt", "anonymous"]
ENV_KEYS = "PAGEDSERVE_API_KEYS"
ENV_VLLM_KEY = "VLLM_API_KEY"
_FINGERPRINT_SALT = b"pagedserve-key-id-v1:"
# The largest NumericDate taken (9999-12-31T23:59:59Z): anything later is a bug or an attack.
MAX_NUMERIC_DATE = 253_402_300_799
DEFAULT_JWT_MAX_LIFETIME_S = 24 * 3600.0
_TIME_CLAIMS = ("exp", "nbf", "iat")


def key_fingerprint(secret: str) -> str:
    """A short, non-reversible id for a credential (safe to log and audit; never the key)."""
    return hashlib.sha256(_FINGERPRINT_SALT + secret.encode()).hexdigest()[:12]


@dataclass(slots=True, frozen=True)
class Principal:
    kind: PrincipalKind
    tenant: str | None
    key_id: str
    subject: str | None = None  # the JWT `sub` claim, when there is one
    # the JWT's policy claim (AuthConfig.policy_claim), read by ops/tenants.py; not compared
    policy: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)


ANONYMOUS = Principal(kind="anonymous", tenant=None, key_id="anonymous")


@dataclass(slots=True)
class _StoredKey:
    digest: bytes  # sha256(key)
    key_id: str
    tenant: str | None


def split_keys(values: Iterable[str]) -> list[str]:
    """["a,b", " c "] -> ["a", "b", "c"] (empty entries dropped)."""
    return [k.strip() for v in values for k in v.split(",") if k.strip()]


KeyFileEntry = tuple[str, str | None, dict[str, str]]  # key, tenant, the tenant's policy fields


def read_key_file_entries(path: str | os.PathLike[str]) -> list[tuple[int, KeyFileEntry]]:
    """(line number, entry) of lines `KEY [TENANT [name=value ...]]`; blank lines and `#`
    comments (whole-line or trailing) are skipped. Policy fields need a tenant (ops/tenants.py
    checks their names and values)."""
    entries: list[tuple[int, KeyFileEntry]] = []
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        options: dict[str, str] = {}
        for item in parts[2:]:
            name, eq, value = item.partition("=")
            if not eq or not name or not value:
                raise ValueError(f"api key file {path}: line {lineno} must be 'KEY [TENANT [name=value ...]]', "
                                 f"got {len(parts)} fields ({item[:1]}... is not name=value)")
            if name in options:
                raise ValueError(f"api key file {path}: line {lineno} gives {name!r} twice")
            options[name] = value
        if len(parts) > 1 and "=" in parts[1]:
            raise ValueError(f"api key file {path}: line {lineno}: policy fields need a tenant name first")
        entries.append((lineno, (parts[0], parts[1] if len(parts) >= 2 else None, options)))
    return entries


def read_key_file(path: str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """(key, tenant) of each line (see read_key_file_entries)."""
    return [(key, tenant) for _, (key, tenant, _) in read_key_file_entries(path)]


@dataclass(slots=True)
class AuthConfig:
    api_keys: list[str] = field(default_factory=list)  # from --api-key (comma lists allowed)
    api_key_file: str | None = None
    use_env: bool = True  # read PAGEDSERVE_API_KEYS and VLLM_API_KEY
    jwt_secret: str | None = None  # enables HS256
    jwt_public_key: str | None = None  # PEM text or a path to a PEM file; enables RS256
    jwt_audience: str | None = None  # required when JWT is enabled
    jwt_issuer: str | None = None
    tenant_claim: str = "tenant"
    policy_claim: str | None = None  # a claim holding the tenant's policy object (ops/tenants.py)
    leeway_s: float = 0.0  # clock skew allowed on exp / nbf / iat
    # Longest accepted token lifetime: exp - iat (exp - now without iat); 0 = no limit.
    jwt_max_lifetime_s: float = DEFAULT_JWT_MAX_LIFETIME_S

    def __post_init__(self) -> None:
        if (self.jwt_secret or self.jwt_public_key) and not self.jwt_audience:
            raise ValueError(
                "jwt_audience must be set when JWT auth is enabled (jwt_secret or jwt_public_key)."
            )
        if self.leeway_s < 0:
            raise ValueError(f"leeway_s must be >= 0, got {self.leeway_s}.")
        if not self.tenant_claim:
            raise ValueError("tenant_claim must be a non-empty claim name.")
        if not math.isfinite(self.jwt_max_lifetime_s) or self.jwt_max_lifetime_s < 0:
            raise ValueError(
                f"jwt_max_lifetime_s must be a finite number >= 0 (0 = no limit), got {self.jwt_max_lifetime_s}."
            )


def _load_pem(value: str) -> str:
    if "-----BEGIN" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"jwt_public_key must be PEM text or a path to a PEM file; {value!r} is neither.")
    return path.read_text(encoding="utf-8")


class Authenticator:
    """authenticate(Authorization header) -> Principal, or raises a 401 AuthenticationError."""

    def __init__(self, config: AuthConfig, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        entries: list[tuple[str, str | None]] = [(k, None) for k in split_keys(config.api_keys)]
        if config.api_key_file:
            entries += read_key_file(config.api_key_file)
        if config.use_env:
            entries += [(k, None) for k in split_keys([env.get(ENV_KEYS, ""), env.get(ENV_VLLM_KEY, "")])]
        seen: dict[bytes, _StoredKey] = {}
        for key, tenant in entries:
            digest = hashlib.sha256(key.encode()).digest()
            if digest not in seen or tenant is not None:  # a file entry may add a tenant to a CLI key
                seen[digest] = _StoredKey(digest, key_fingerprint(key), tenant)
        self._keys: list[_StoredKey] = list(seen.values())
        self._config = config
        # Key per accepted algorithm. Listing algorithms explicitly is what stops the
        # "RS256 public key used as an HS256 secret" confusion attack.
        self._jwt_keys: dict[str, Any] = {}
        if config.jwt_secret:
            self._jwt_keys["HS256"] = config.jwt_secret
        if config.jwt_public_key:
            self._jwt_keys["RS256"] = _load_pem(config.jwt_public_key)

    @property
    def enabled(self) -> bool:
        return bool(self._keys or self._jwt_keys)

    @property
    def num_api_keys(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization_header: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization_header:
            raise AuthenticationError("Missing Authorization header; send 'Authorization: Bearer <key>'.")
        scheme, _, token = authorization_header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Authorization header must be 'Bearer <key>'.")
        matched = self._match_api_key(token)
        if matched is not None:
            return Principal(kind="api_key", tenant=matched.tenant, key_id=matched.key_id)
        if self._jwt_keys and token.count(".") == 2:
            return self._authenticate_jwt(token)
        raise AuthenticationError("Invalid API key.")

    def _match_api_key(self, token: str) -> _StoredKey | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: _StoredKey | None = None
        for stored in self._keys:  # no early exit: every key is compared every time
            if hmac.compare_digest(digest, stored.digest):
                found = stored
        return found

    def _authenticate_jwt(self, token: str) -> Principal:
        cfg = self._config
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise AuthenticationError("Invalid bearer token: malformed JWT.") from None
        if alg not in self._jwt_keys:
            raise AuthenticationError(
                f"Invalid bearer token: algorithm {alg!r} is not accepted (accepted: {sorted(self._jwt_keys)})."
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._jwt_keys[alg],
                algorithms=[alg],
                audience=cfg.jwt_audience,
                issuer=cfg.jwt_issuer,
                leeway=cfg.leeway_s,
                options={"require": ["exp", "aud"] + (["iss"] if cfg.jwt_issuer else [])},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("Invalid bearer token: the token has expired.") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("Invalid bearer token: wrong audience.") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("Invalid bearer token: wrong issuer.") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("Invalid bearer token: bad signature.") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthenticationError(f"Invalid bearer token: missing '{e.claim}' claim.") from None
        except jwt.PyJWTError as e:
            raise AuthenticationError(f"Invalid bearer token: {e}.") from None
        _check_time_claims(claims, time.time(), cfg.jwt_max_lifetime_s, cfg.leeway_s)
        tenant = claims.get(cfg.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise AuthenticationError(f"Invalid bearer token: missing '{cfg.tenant_claim}' claim.")
        sub = claims.get("sub") if isinstance(claims.get("sub"), str) else None
        # key_id groups one caller's tokens: issuer + subject when known, else the token itself.
        ident = f"{claims.get('iss', '')}|{sub}" if sub else token
        policy = claims.get(cfg.policy_claim) if cfg.policy_claim else None
        if policy is not None and not isinstance(policy, dict):
            raise AuthenticationError(f"Invalid bearer token: the '{cfg.policy_claim}' claim must be an object.")
        return Principal(kind="jwt", tenant=tenant, key_id="jwt-" + key_fingerprint(ident), subject=sub,
                         policy=policy)


def _check_time_claims(claims: Mapping[str, Any], now: float, max_lifetime_s: float, leeway_s: float) -> None:
    """Runs after PyJWT has checked the signature and exp / nbf / iat against the clock.

    PyJWT coerces with int(), so it lets through strings of digits and absurd values; here each
    time claim must be a real JSON number in [0, MAX_NUMERIC_DATE], nbf and iat not after exp,
    and the lifetime within max_lifetime_s (+ leeway, for the exp - now case's clock skew).
    """
    for name in _TIME_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AuthenticationError(
                f"Invalid bearer token: '{name}' must be a number of seconds since the epoch, "
                f"got {type(value).__name__}."
            )
        if not math.isfinite(value) or not 0 <= value <= MAX_NUMERIC_DATE:
            raise AuthenticationError(
                f"Invalid bearer token: '{name}' is out of range (must be within [0, {MAX_NUMERIC_DATE}])."
            )
    exp = float(claims["exp"])
    for name in ("nbf", "iat"):
        if name in claims and float(claims[name]) > exp:
            raise AuthenticationError(f"Invalid bearer token: '{name}' is after 'exp'.")
    if max_lifetime_s > 0:
        start = float(claims["iat"]) if "iat" in claims else now
        if exp - start > max_lifetime_s + leeway_s:
            basis = "exp - iat" if "iat" in claims else "exp - now"
            raise AuthenticationError(
                f"Invalid bearer token: lifetime ({basis} = {exp - start:.0f} s) exceeds the "
                f"{max_lifetime_s:.0f} s limit (--jwt-max-lifetime)."
            )


# ---------------------------------------------------------------------------- FastAPI integration

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


def auth_dependency(authenticator: Authenticator) -> Callable[..., Principal]:
    """A FastAPI dependency: `Depends(auth_dependency(a))` gives the route its Principal."""

    def dependency(request: Request) -> Principal:
        principal = authenticator.authenticate(request.headers.get("authorization"))
        request.state.principal = principal
        return principal

    return dependency


# Routes that answer without credentials even when credentials are configured. Everything else
# (every /v1 route, /tokenize, /detokenize, /docs, /openapi.json, unknown paths) needs them:
#   /health, /ping   liveness/readiness probes (k8s, SageMaker) send no credentials; body is a status
#   /version         the server version only
#   /metrics         Prometheus scrapers; aggregate counters, no request content
# /docs, /redoc and /openapi.json stay protected on purpose: they enumerate every route and
# request schema (admin and extension routes included) and no client needs them to call the API.
DEFAULT_PUBLIC_PATHS: frozenset[str] = frozenset({"/health", "/ping", "/version", "/metrics"})


def route_path(scope: Mapping[str, Any]) -> str:
    """The path the router matches: scope["path"] without the root path.

    uvicorn puts `--root-path` in front of every path ("/api" + "/v1/completions"); a proxy that
    already strips the prefix yields a path without it. Both give "/v1/completions" here.
    """
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def is_cors_preflight(scope: Mapping[str, Any]) -> bool:
    """OPTIONS carrying Access-Control-Request-Method: a browser's preflight (sends no credentials)."""
    if scope.get("method") != "OPTIONS":
        return False
    return any(name == b"access-control-request-method" for name, _ in scope.get("headers", []))


class AuthMiddleware:
    """Pure-ASGI, deny-by-default: with credentials configured every HTTP and WebSocket request
    needs them, except CORS preflights and the exact paths in `public_paths`.

    Invariant: a request is let through unauthenticated only if its route path (root path
    stripped, see `route_path`) is byte-for-byte a public path. Any other spelling (double
    slashes, trailing slash, other case, percent-encoded characters, which uvicorn has already
    decoded in scope["path"]) is not public, so it needs credentials whatever route it would
    reach; proxy headers are never consulted. Matching allowed paths, not protected ones, is what
    keeps a new route, a root path or an odd spelling from being unguarded.

    The Principal lands in `scope["state"]["principal"]` (= `request.state.principal`). Pure ASGI,
    so streamed responses are not buffered.
    """

    def __init__(
        self, app: ASGIApp, authenticator: Authenticator, public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.public_paths = frozenset(public_paths)

    def needs_credentials(self, scope: Mapping[str, Any]) -> bool:
        if scope["type"] not in ("http", "websocket"):
            return False  # lifespan
        if scope["type"] == "http" and is_cors_preflight(scope):
            return False
        return route_path(scope) not in self.public_paths

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if not self.needs_credentials(scope):
            await self.app(scope, receive, send)
            return
        header: str | None = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            principal = self.authenticator.authenticate(header)
        except AuthenticationError as err:
            if scope["type"] == "websocket":  # closing before accept: the server answers 403
                await send({"type": "websocket.close", "code": 1008, "reason": "authentication failed"})
                return
            await err.to_response()(scope, receive, send)  # type: ignore[arg-type]
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
