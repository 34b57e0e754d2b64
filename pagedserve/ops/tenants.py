"""Tenant policies: who may do how much, and how a tenant's requests are treated.

Sources, merged field by field (later wins):

    --tenant-config FILE   YAML/JSON: `defaults:` (every tenant, the anonymous one too),
                           `tenants: {NAME: {...}}`, `routes: {"/v1/chat/completions": {output: ...}}`,
                           `max_tenant_labels: N`
    --api-key-file         `KEY TENANT name=value ...` (today's `KEY [TENANT]` lines stay valid)
    JWT                    the claim named by --jwt-policy-claim (an object), as the issuer grants it

Fields (key-file short names in brackets):

    requests_per_minute [rpm]     tokens_per_minute [tpm] (prompt + completion)
    max_concurrent [concurrency]  max_tokens (the largest max_tokens; also the default)
    allowed_models [models, comma list]
    priority_class [priority]     "interactive" | "batch" (read by the scheduler's SLO admission)
    deidentify                    "off" | "mask" | "reversible" (on for every request of the tenant)
    mrn_patterns                  regexes of medical record numbers (YAML/JWT only)
    cache_group                   tenants with the same group share cached prefixes; default: none
                                  shared, every tenant has its own cache salt
    output                        {json_schema: {...}} or {regex: "..."}: every output must match

The request state the routes and the scheduler side read (set by TenantMiddleware, right inside
AuthMiddleware): `request.state.tenant` (a TenantContext) and `request.state.priority_class`
(a plain str, or None when the policy sets none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pagedserve.entrypoints.openai.errors import AuthenticationError
from pagedserve.ops.auth import read_key_file_entries

PRIORITY_CLASSES = ("interactive", "batch")
DEID_SETTINGS = ("off", "mask", "reversible")
ANONYMOUS_LABEL = "anonymous"
OTHER_LABEL = "other"
DEFAULT_MAX_TENANT_LABELS = 100
_SHORT_NAMES = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "concurrency": "max_concurrent",
                "models": "allowed_models", "priority": "priority_class"}  # fmt: skip
_INT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "max_tokens")


@dataclass(slots=True, frozen=True)
class OutputRequirement:
    """What every output must match: a JSON schema or a regex (exactly one)."""

    json_schema: Mapping[str, Any] | None = None
    regex: str | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> OutputRequirement:
        if not isinstance(value, Mapping) or set(value) - {"json_schema", "regex"} or len(value) != 1:
            raise ValueError(f"{where}: output must be {{json_schema: {{...}}}} or {{regex: '...'}}")
        schema, regex = value.get("json_schema"), value.get("regex")
        if schema is not None and not isinstance(schema, Mapping):
            raise ValueError(f"{where}: output.json_schema must be an object")
        if regex is not None and (not isinstance(regex, str) or not regex):
            raise ValueError(f"{where}: output.regex must be a non-empty string")
        return cls(json_schema=schema, regex=regex)

    def as_structured_outputs(self) -> dict[str, Any]:
        """The spec in vLLM's `structured_outputs` form."""
        return {"json": dict(self.json_schema)} if self.json_schema is not None else {"regex": self.regex}


@dataclass(slots=True, frozen=True)
class TenantPolicy:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    max_tokens: int | None = None
    allowed_models: frozenset[str] | None = None
    priority_class: str | None = None
    deidentify: str | None = None  # None: each request decides (off unless it asks)
    mrn_patterns: tuple[str, ...] = ()
    cache_group: str | None = None
    output: OutputRequirement | None = None

    def merged(self, values: Mapping[str, Any], where: str) -> TenantPolicy:
        """This policy with `values` (raw config: YAML, key-file strings or JWT claims) over it."""
        return replace(self, **parse_fields(values, where))


_FIELD_NAMES = frozenset(f.name for f in fields(TenantPolicy))


def _int(value: Any, name: str, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _str_list(value: Any, name: str, where: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and i.strip() for i in items):
        raise ValueError(f"{where}: {name} must be a list of names (or a comma list)")
    return tuple(i.strip() for i in items)


def parse_fields(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Raw policy fields -> TenantPolicy keyword arguments, each checked; ValueError naming it."""
    out: dict[str, Any] = {}
    for raw_name, value in values.items():
        name = _SHORT_NAMES.get(str(raw_name), str(raw_name))
        if name not in _FIELD_NAMES:
            raise ValueError(f"{where}: unknown tenant policy field {raw_name!r} (known: {sorted(_FIELD_NAMES)})")
        if value is None:
            out[name] = None if name != "mrn_patterns" else ()
        elif name in _INT_FIELDS:
            out[name] = _int(value, name, where)
        elif name == "allowed_models":
            out[name] = frozenset(_str_list(value, name, where))
        elif name == "mrn_patterns":
            out[name] = _str_list([value] if isinstance(value, str) else value, name, where)
            from pagedserve.ops.deid import recognizers_for

            recognizers_for(out[name])  # each must compile
        elif name == "priority_class":
            if value not in PRIORITY_CLASSES:
                raise ValueError(f"{where}: priority_class must be one of {list(PRIORITY_CLASSES)}, got {value!r}")
            out[name] = value
        elif name == "deidentify":
            if value is False:
                value = "off"
            if value not in DEID_SETTINGS:
                raise ValueError(f"{where}: deidentify must be one of {list(DEID_SETTINGS)}, got {value!r}")
            out[name] = None if value == "off" else value
        elif name == "cache_group":
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: cache_group must be a non-empty string")
            out[name] = value
        else:  # output
            out[name] = OutputRequirement.parse(value, where)
    return out


@dataclass(slots=True, frozen=True)
class TenantContext:
    """One request's tenant: its name (None: anonymous), metrics label and effective policy."""

    name: str | None
    label: str
    policy: TenantPolicy

    @property
    def priority_class(self) -> str | None:
        return self.policy.priority_class

    @property
    def limiter_key(self) -> str:
        return self.name if self.name is not None else ""

    def cache_salt(self, request_salt: str | None) -> str | None:
        """The salt the engine hashes into the first prefix-cache block. A tenant's own part
        comes first, so no request salt can reproduce another tenant's salt; tenants that share
        a cache_group share it. Anonymous requests without a salt get none (vLLM's default)."""
        if self.policy.cache_group is not None:
            own = "group:" + self.policy.cache_group
        elif self.name is not None:
            own = "tenant:" + self.name
        else:
            own = ""
        if request_salt is None:
            return own or None
        return f"{own}\x1f{request_salt}" if own else "request:" + request_salt


class TenantLabels:
    """tenant -> metrics label with bounded cardinality: configured tenants always keep their
    name; others (JWT tenants) get theirs until `limit` distinct labels exist, then OTHER_LABEL."""

    def __init__(self, configured: Iterable[str], limit: int = DEFAULT_MAX_TENANT_LABELS) -> None:
        self.configured = frozenset(configured)
        self.limit = limit
        self._seen: set[str] = set()

    def label(self, tenant: str | None) -> str:
        if tenant is None:
            return ANONYMOUS_LABEL
        if tenant in self.configured or tenant in self._seen:
            return tenant
        if len(self._seen) < self.limit:
            self._seen.add(tenant)
            return tenant
        return OTHER_LABEL


@dataclass(slots=True)
class TenantRegistry:
    defaults: TenantPolicy = field(default_factory=TenantPolicy)
    tenants: dict[str, TenantPolicy] = field(default_factory=dict)
    routes: dict[str, OutputRequirement] = field(default_factory=dict)
    labels: TenantLabels = field(default_factory=lambda: TenantLabels(()))

    def resolve(self, tenant: str | None, jwt_policy: Mapping[str, Any] | None = None) -> TenantContext:
        policy = self.tenants.get(tenant, self.defaults) if tenant is not None else self.defaults
        if jwt_policy:
            policy = policy.merged(jwt_policy, f"JWT policy claim of tenant {tenant!r}")
        return TenantContext(tenant, self.labels.label(tenant), policy)

    def route_output(self, path: str) -> OutputRequirement | None:
        return self.routes.get(path)


def load_registry(config_file: str | os.PathLike[str] | None, key_file: str | os.PathLike[str] | None,
                  max_tenant_labels: int | None = None) -> TenantRegistry:  # fmt: skip
    """The registry of --tenant-config and the policy fields of --api-key-file; ValueError naming
    the file, line or key at fault."""
    raw: dict[str, Any] = {}
    if config_file is not None:
        text = Path(config_file).read_text(encoding="utf-8")
        raw = json.loads(text) if str(config_file).endswith(".json") else (yaml.safe_load(text) or {})
        if not isinstance(raw, dict):
            raise ValueError(f"tenant config {config_file}: must be a mapping")
        unknown = set(raw) - {"defaults", "tenants", "routes", "max_tenant_labels"}
        if unknown:
            raise ValueError(f"tenant config {config_file}: unknown keys {sorted(unknown)}")
    where = f"tenant config {config_file}"
    defaults = TenantPolicy().merged(_mapping(raw.get("defaults"), f"{where}: defaults"), f"{where}: defaults")
    tenants = {str(name): defaults.merged(_mapping(values, f"{where}: tenants.{name}"), f"{where}: tenants.{name}")
               for name, values in _mapping(raw.get("tenants"), f"{where}: tenants").items()}  # fmt: skip
    routes = {str(path): OutputRequirement.parse(_mapping(v, f"{where}: routes.{path}").get("output"),
                                                 f"{where}: routes.{path}")
              for path, v in _mapping(raw.get("routes"), f"{where}: routes").items()}  # fmt: skip
    if key_file is not None:
        given: dict[str, dict[str, str]] = {}
        for lineno, (_, tenant, options) in read_key_file_entries(key_file):
            if not options or tenant is None:
                continue
            line_where = f"api key file {key_file}: line {lineno}"
            if tenant in given and given[tenant] != options:
                raise ValueError(f"{line_where}: tenant {tenant!r} has a different policy on another line; "
                                 "give a tenant's policy once (or the same on each of its keys)")
            given[tenant] = options
            tenants[tenant] = tenants.get(tenant, defaults).merged(options, line_where)
    limit = max_tenant_labels if max_tenant_labels is not None else raw.get("max_tenant_labels")
    limit = DEFAULT_MAX_TENANT_LABELS if limit is None else _int(limit, "max_tenant_labels", where)
    return TenantRegistry(defaults, tenants, routes, TenantLabels(tenants, limit))


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping")
    return value


# ---------------------------------------------------------------------------- ASGI

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class TenantMiddleware:
    """Right inside AuthMiddleware: resolves the principal's tenant policy into
    scope["state"]["tenant"] (TenantContext) and scope["state"]["priority_class"], and ends the
    request's rate-limit lease (scope["state"]["tenant_lease"], taken at admission by the route)
    once the response, streamed or not, is over: every path releases it exactly once."""

    def __init__(self, app: ASGIApp, registry: TenantRegistry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:  # fmt: skip
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        principal = state.get("principal")
        try:
            ctx = self.registry.resolve(getattr(principal, "tenant", None), getattr(principal, "policy", None))
        except ValueError as e:  # a JWT policy claim that does not parse: the token is refused
            await AuthenticationError(f"Invalid bearer token: {e}").to_response()(scope, receive, send)  # type: ignore[arg-type]
            return
        state["tenant"] = ctx
        state["priority_class"] = ctx.priority_class
        try:
            await self.app(scope, receive, send)
        finally:
            lease = state.pop("tenant_lease", None)
            if lease is not None:
                lease.release()
