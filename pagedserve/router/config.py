"""router.yaml, validated with pydantic: unknown keys and bad values are errors that name the key.

    listen: {host: 127.0.0.1, port: 9000}
    probe_interval_s: 1.0
    regions:
      - name: shanghai
        priority: 0                      # lower is preferred
        backends:
          - {url: "http://127.0.0.1:8001", weight: 1, api_key: "sk-a"}
    canary:  {backends: [...], weight: 0.1, window_s: 60, max_error_rate: 0.2, max_p99_s: 30}
    shadow:  {backends: [...], fraction: 0.1}
    affinity: {session_header: x-session-id, prefix_chars: 256, load_factor: 1.25}
    auth:    {api_keys: [...], jwt_secret: ..., jwt_audience: ...}   # the server's auth options
    tenants: {acme: [shanghai]}          # pin a tenant to regions

`load_config(path)` raises ConfigError with every problem listed; a reload that fails validation
keeps the running config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pagedserve.ops.auth import AuthConfig

PositiveFloat = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Strict):
    url: str
    weight: PositiveFloat = 1.0
    api_key: str | None = None  # sent to the backend as `Authorization: Bearer ...`

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class RegionConfig(_Strict):
    name: Annotated[str, Field(min_length=1)]
    priority: int = 0
    backends: Annotated[list[BackendConfig], Field(min_length=1)]


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9000


class BreakerConfig(_Strict):
    failure_threshold: Annotated[int, Field(ge=1)] = 3  # consecutive failures that open it
    open_s: PositiveFloat = 5.0  # how long it stays open before one half-open trial


class CanaryConfig(_Strict):
    """A share `weight` of traffic goes to these backends; rolled back to 0 when, over the last
    `window_s` seconds and at least `min_requests` requests, the error rate or P99 passes its bound."""

    backends: Annotated[list[BackendConfig], Field(min_length=1)]
    weight: Annotated[float, Field(ge=0, le=1)] = 0.1
    window_s: PositiveFloat = 60.0
    min_requests: Annotated[int, Field(ge=1)] = 10
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.2
    max_p99_s: PositiveFloat | None = None


class ShadowConfig(_Strict):
    """A share `fraction` of requests is mirrored to these backends; their answers are compared
    with the primary's and discarded."""

    backends: Annotated[list[BackendConfig], Field(min_length=1)]
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.1


class AffinityConfig(_Strict):
    session_header: str | None = "x-session-id"  # requests with this header stick to one backend
    prefix: bool = True  # route by a hash of the prompt's start (consistent hashing, bounded load)
    prefix_chars: Annotated[int, Field(ge=1)] = 256  # characters (or token ids) hashed
    load_factor: Annotated[float, Field(ge=1.0)] = 1.25  # a backend takes at most this x the mean load


class AuthSection(_Strict):
    """The server's auth options (pagedserve.ops.auth.AuthConfig): same keys, same checks."""

    api_keys: list[str] = Field(default_factory=list)
    api_key_file: str | None = None
    use_env: bool = True
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    tenant_claim: str = "tenant"
    leeway_s: Annotated[float, Field(ge=0)] = 0.0

    def to_auth_config(self) -> AuthConfig:
        return AuthConfig(**self.model_dump())

    @model_validator(mode="after")
    def _check(self) -> AuthSection:
        self.to_auth_config()  # AuthConfig's own checks (jwt_audience with JWT, ...)
        return self


class RouterConfig(_Strict):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    probe_interval_s: PositiveFloat = 1.0
    probe_timeout_s: PositiveFloat = 1.0
    connect_timeout_s: PositiveFloat = 2.0
    read_timeout_s: PositiveFloat = 60.0  # silence on a stream this long counts as a broken backend
    retry_deadline_s: PositiveFloat = 15.0  # a request is retried/resumed until this much time passed
    max_attempts: Annotated[int, Field(ge=1)] = 8
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    regions: Annotated[list[RegionConfig], Field(min_length=1)]
    canary: CanaryConfig | None = None
    shadow: ShadowConfig | None = None
    affinity: AffinityConfig = Field(default_factory=AffinityConfig)
    auth: AuthSection = Field(default_factory=AuthSection)
    tenants: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        names = [r.name for r in self.regions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"region names must be unique; repeated: {dup}")
        urls = [b.url for r in self.regions for b in r.backends]
        urls += [b.url for g in (self.canary, self.shadow) if g is not None for b in g.backends]
        dup = sorted({u for u in urls if urls.count(u) > 1})
        if dup:
            raise ValueError(f"a backend url may appear only once; repeated: {dup}")
        for tenant, regions in self.tenants.items():
            unknown = sorted(set(regions) - set(names))
            if unknown or not regions:
                raise ValueError(f"tenants.{tenant} must list known regions; unknown: {unknown}")
        return self


class ConfigError(ValueError):
    pass


def parse_config(data: Any, source: str = "config") -> RouterConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {str(err['msg']).removeprefix('Value error, ')}")
        raise ConfigError(f"{source}: invalid router config:\n" + "\n".join(lines)) from None


def load_config(path: str | Path) -> RouterConfig:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read router config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path))
