"""JSON schemas for the four custom resources the deployment ships, written from the CRDs' API
references for the fields this project uses (kubernetes-validate bundles core kinds only).

They are deliberately closed (`additionalProperties: false`) on every object we write, so a typo
(`validationFailureActon`, `endpoint:`) fails; fields of the CRDs that the manifests do not use are
absent and would fail too: add them here when a manifest starts using them.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABELSEL = {"type": "object", "additionalProperties": False,
             "properties": {"matchLabels": _STRMAP, "matchExpressions": {"type": "array"}}}  # fmt: skip


def _closed(required: list[str], /, **props: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": required, "properties": props}


_META = _closed(["name"], name=_STR, namespace=_STR, labels=_STRMAP, annotations=_STRMAP)


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _closed(["apiVersion", "kind", "metadata", "spec"], apiVersion={"const": api_version},
                   kind={"const": kind}, metadata=_META, spec=spec)  # fmt: skip


_RELABEL = _closed([], sourceLabels={"type": "array", "items": _STR}, targetLabel=_STR, regex=_STR,
                   replacement=_STR, action={"enum": ["replace", "keep", "drop", "labelmap", "labeldrop",
                                                      "labelkeep", "hashmod", "lowercase", "uppercase"]})  # fmt: skip
SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", _closed(
    ["selector", "endpoints"], selector=_LABELSEL, namespaceSelector=_closed([], matchNames={"type": "array"}),
    endpoints={"type": "array", "minItems": 1, "items": _closed(
        ["port"], port=_STR, path=_STR, interval={"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
        scrapeTimeout=_STR, scheme={"enum": ["http", "https"]},
        relabelings={"type": "array", "items": _RELABEL})},
))  # fmt: skip

_RULE = {"type": "object", "additionalProperties": False, "required": ["expr"],
         "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
         "properties": {"alert": _STR, "record": _STR, "expr": _STR,
                        "for": {"type": "string", "pattern": r"^[0-9]+(s|m|h)$"}, "keep_firing_for": _STR,
                        "labels": _STRMAP, "annotations": _STRMAP}}  # fmt: skip
PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", _closed(
    ["groups"], groups={"type": "array", "minItems": 1, "items": _closed(
        ["name", "rules"], name=_STR, interval=_STR, rules={"type": "array", "minItems": 1, "items": _RULE})},
))  # fmt: skip

_MATCH = _closed([], any={"type": "array", "items": _closed(["resources"], resources=_closed(
    ["kinds"], kinds={"type": "array", "items": _STR}, namespaces={"type": "array", "items": _STR}))})
_ATTESTOR_ENTRY = _closed(
    [], keyless=_closed(["issuer", "subject"], issuer=_STR, subject=_STR, rekor=_closed(["url"], url=_STR)),
    keys=_closed(["publicKeys"], publicKeys=_STR, rekor=_closed([], url=_STR, ignoreTlog={"type": "boolean"})),
)  # fmt: skip
_VERIFY = _closed(["imageReferences", "attestors"], imageReferences={"type": "array", "items": _STR},
                  mutateDigest={"type": "boolean"}, verifyDigest={"type": "boolean"}, required={"type": "boolean"},
                  attestors={"type": "array", "items": _closed(
                      ["entries"], count={"type": "integer", "minimum": 1},
                      entries={"type": "array", "minItems": 1, "items": _ATTESTOR_ENTRY})})  # fmt: skip
KYVERNO_CLUSTER_POLICY = _resource("kyverno.io/v1", "ClusterPolicy", _closed(
    ["rules"], validationFailureAction={"enum": ["Enforce", "Audit"]}, background={"type": "boolean"},
    webhookTimeoutSeconds={"type": "integer", "minimum": 1, "maximum": 30},
    rules={"type": "array", "minItems": 1, "items": {
        **_closed(["name", "match"], name=_STR, match=_MATCH, verifyImages={"type": "array", "items": _VERIFY},
                  validate=_closed(["pattern"], message=_STR, pattern={"type": "object"})),
        "oneOf": [{"required": ["verifyImages"]}, {"required": ["validate"]}]}},
))  # fmt: skip

_APP_SPEC = _closed(
    ["project", "source", "destination"], project=_STR,
    source=_closed(["repoURL", "path", "targetRevision"], repoURL=_STR, path=_STR, targetRevision=_STR),
    destination=_closed([], name=_STR, server=_STR, namespace=_STR),
    syncPolicy=_closed([], automated=_closed([], prune={"type": "boolean"}, selfHeal={"type": "boolean"}),
                       syncOptions={"type": "array", "items": {"type": "string", "pattern": r"^[A-Za-z]+=(true|false)$"}},
                       retry=_closed([], limit={"type": "integer"}, backoff=_closed(
                           [], duration=_STR, factor={"type": "integer"}, maxDuration=_STR))),
    ignoreDifferences={"type": "array", "items": _closed(
        ["kind"], group=_STR, kind=_STR, name=_STR, namespace=_STR,
        jsonPointers={"type": "array", "items": {"type": "string", "pattern": "^/"}})},
)  # fmt: skip
APPLICATION_SET = _resource("argoproj.io/v1alpha1", "ApplicationSet", _closed(
    ["generators", "template"], goTemplate={"type": "boolean"}, goTemplateOptions={"type": "array"},
    generators={"type": "array", "minItems": 1, "items": _closed(
        [], list=_closed(["elements"], elements={"type": "array", "minItems": 1, "items": _STRMAP}))},
    strategy=_closed(["type"], type={"enum": ["RollingSync"]}, rollingSync=_closed(
        ["steps"], steps={"type": "array", "items": _closed(
            ["matchExpressions"], matchExpressions={"type": "array"}, maxUpdate={})})),
    template=_closed(["metadata", "spec"], metadata=_closed(["name"], name=_STR, labels=_STRMAP), spec=_APP_SPEC),
))  # fmt: skip

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("kyverno.io/v1", "ClusterPolicy"): KYVERNO_CLUSTER_POLICY,
    ("argoproj.io/v1alpha1", "ApplicationSet"): APPLICATION_SET,
}
