"""Who may reach what in the rendered chart: the internal token and API key Secrets, the NetworkPolicies (evaluated
the way Kubernetes does for the selectors the chart uses), Ingress / HTTPRoute / HPA for the gateway, and a model
downloaded from the Hugging Face Hub by an init container."""

from __future__ import annotations

import base64
from typing import Any

import helm_python as helm
import pytest

from tests.unit.deploy.scripts import load

examples = load("chart_examples")
CASES = examples.cases()
ROLES = ("gateway", "conductor", "prefill", "decode", "kvstore")
NAMESPACE = examples.NAMESPACE
RELEASE_POD = {"app.kubernetes.io/name": "crescent", "app.kubernetes.io/instance": examples.RELEASE}
Doc = dict[str, Any]


def render_case(name: str) -> list[Doc]:
    return examples.manifests(examples.render(examples.load_values(CASES[name])))


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def workload(docs: list[Doc], role: str) -> Doc:
    hits = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            and d["metadata"]["labels"]["app.kubernetes.io/component"] == role]
    assert len(hits) == 1, role
    return hits[0]


def env_entries(w: Doc) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in w["spec"]["template"]["spec"]["containers"][0]["env"]}


def secret_ref(w: Doc, name: str) -> tuple[str, str] | None:
    entry = env_entries(w).get(name)
    if entry is None:
        return None
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


# --- Secrets ---------------------------------------------------------------------------------------------------

def test_every_service_reads_a_generated_internal_token():
    docs = render_case("default")
    for role in ROLES:
        assert secret_ref(workload(docs, role), "CRESCENT_INTERNAL_TOKEN") == ("crescent-internal-token", "token")
        assert secret_ref(workload(docs, role), "CRESCENT_API_KEY") is None
    (secret,) = of_kind(docs, "Secret")
    assert secret["metadata"]["name"] == "crescent-internal-token"
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()


def test_existing_secrets_are_referenced_not_created():
    docs = render_case("secure-gateway")
    assert of_kind(docs, "Secret") == []
    for role in ROLES:
        assert secret_ref(workload(docs, role), "CRESCENT_INTERNAL_TOKEN") == ("crescent-internal", "token")
    assert secret_ref(workload(docs, "gateway"), "CRESCENT_API_KEY") == ("crescent-api-key", "api-key")
    assert all(secret_ref(workload(docs, r), "CRESCENT_API_KEY") is None for r in ROLES if r != "gateway")


def test_internal_auth_can_be_turned_off():
    docs = examples.manifests(examples.render({"internalAuth": {"enabled": False}}))
    assert of_kind(docs, "Secret") == []
    assert all(secret_ref(workload(docs, r), "CRESCENT_INTERNAL_TOKEN") is None for r in ROLES)


# --- NetworkPolicy ---------------------------------------------------------------------------------------------

def _labels_match(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the evaluator handles matchLabels only: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: Doc, pod: Doc) -> bool:
    """A `from` entry: podSelector alone means this namespace; namespaceSelector picks namespaces by label."""
    assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
    if "namespaceSelector" in peer:
        ns_ok = _labels_match(peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod["namespace"]})
    else:
        ns_ok = pod["namespace"] == NAMESPACE
    return ns_ok and _labels_match(peer.get("podSelector", {}), pod["labels"])


def reachable(docs: list[Doc], role: str, port: int, source: Doc) -> bool:
    """Whether a pod `source` ({namespace, labels}) may open `port` on the role's pods."""
    target = workload(docs, role)["spec"]["template"]["metadata"]["labels"]
    policies = [p["spec"] for p in of_kind(docs, "NetworkPolicy") if _labels_match(p["spec"]["podSelector"], target)]
    if not policies:
        return True
    for spec in policies:
        for rule in spec.get("ingress", []):
            port_ok = "ports" not in rule or any(p["port"] == port for p in rule["ports"])
            from_ok = "from" not in rule or any(_peer_admits(peer, source) for peer in rule["from"])
            if port_ok and from_ok:
                return True
    return False


def pod(namespace: str, role: str | None = None) -> Doc:
    labels = {**RELEASE_POD, "app.kubernetes.io/component": role} if role else {"app": "other"}
    return {"namespace": namespace, "labels": labels}


INTERNAL_PORTS = {"conductor": [50051], "prefill": [50061], "decode": [50071], "kvstore": [50081, 50082]}
METRICS_PORTS = {"conductor": 9051, "prefill": 9061, "decode": 9071, "kvstore": 9081}


@pytest.mark.parametrize("name", ["default", "secure-gateway", "multi-conductor"])
def test_only_the_gateway_faces_outside_the_release(name):
    docs = render_case(name)
    outsider, colleague = pod(NAMESPACE), pod(NAMESPACE, "prefill")
    for role, ports in INTERNAL_PORTS.items():
        for port in ports:
            assert not reachable(docs, role, port, outsider), f"{role}:{port} open to pods outside the release"
            assert reachable(docs, role, port, colleague), f"{role}:{port} closed to the release's pods"
        assert reachable(docs, role, METRICS_PORTS[role], pod("monitoring")), f"{role} metrics closed to Prometheus"
        assert reachable(docs, role, METRICS_PORTS[role], colleague)
    assert reachable(docs, "gateway", 8000, pod("ingress-nginx"))


def test_peers_narrow_the_gateway_and_the_metrics_ports():
    docs = render_case("secure-gateway")
    assert not reachable(docs, "gateway", 8000, pod(NAMESPACE))
    assert not reachable(docs, "prefill", 9061, pod("elsewhere"))
    assert reachable(docs, "prefill", 9061, pod("monitoring"))
    default = render_case("default")
    assert reachable(default, "gateway", 8000, pod("anywhere")) and reachable(default, "prefill", 9061, pod("x"))


def test_only_conductors_reach_redis():
    docs = render_case("multi-conductor")
    assert reachable(docs, "redis", 6379, pod(NAMESPACE, "conductor"))
    assert not reachable(docs, "redis", 6379, pod(NAMESPACE, "prefill"))


def test_network_policies_can_be_turned_off():
    assert of_kind(examples.manifests(examples.render({"networkPolicy": {"enabled": False}})), "NetworkPolicy") == []


# --- Gateway exposure ------------------------------------------------------------------------------------------

def test_ingress_and_gateway_hpa():
    docs = render_case("secure-gateway")
    (ingress,) = of_kind(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "crescent-gateway", "port": {"name": "http"}}
    (hpa,) = [h for h in of_kind(docs, "HorizontalPodAutoscaler")
              if h["spec"]["scaleTargetRef"]["name"] == "crescent-gateway"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "crescent_gateway_requests_in_flight"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in workload(docs, "gateway")["spec"]  # the HPA owns it


def test_http_route():
    docs = render_case("huggingface-model")
    (route,) = of_kind(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "crescent-gateway", "port": 8000}]
    assert of_kind(render_case("default"), "HTTPRoute") == of_kind(render_case("default"), "Ingress") == []


# --- Hugging Face model ----------------------------------------------------------------------------------------

def test_huggingface_model_is_downloaded_by_an_init_container():
    docs = render_case("huggingface-model")
    (script,) = of_kind(docs, "ConfigMap")
    assert script["data"]["hf_download.py"] == (examples.CHART_DIR / "files" / "hf_download.py").read_text()
    for role in ("gateway", "prefill", "decode"):
        w = workload(docs, role)
        spec = w["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        init_env = {e["name"]: e for e in init["env"]}
        assert init_env["HF_MODEL_ID"]["value"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert init_env["HF_DEST"]["value"] == "/models/HuggingFaceTB--SmolLM2-135M-Instruct"
        assert init_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        env = env_entries(w)
        assert env["CRESCENT_MODEL"]["value"] == init_env["HF_DEST"]["value"]
        assert env["CRESCENT_SERVED_MODEL_NAME"]["value"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"] == {"name": "models", "emptyDir": {"sizeLimit": "2Gi"}}
        assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]  # writable for the download
    for role in ("conductor", "kvstore"):
        assert "initContainers" not in workload(docs, role)["spec"]["template"]["spec"]


BAD_VALUES = [
    ({"gateway": {"httpRoute": {"enabled": True}}}, helm.HelmRenderError, "gateway.httpRoute.parentRefs is empty"),
    ({"model": {"source": "huggingface"}}, helm.HelmRenderError, "model.huggingface.id is required"),
    ({"model": {"source": "huggingface", "huggingface": {"id": "no-org"}}}, helm.HelmValuesError,
     "/model/huggingface/id"),
    ({"gateway": {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}}},
     helm.HelmRenderError, "set gateway.resources.requests.cpu"),
    ({"internalAuth": {"key": ""}}, helm.HelmValuesError, "/internalAuth/key"),
]


@pytest.mark.parametrize("values,error,message", BAD_VALUES, ids=[str(v) for v, _, _ in BAD_VALUES])
def test_bad_values_are_rejected_readably(values, error, message):
    with pytest.raises(error) as caught:
        examples.render(values)
    assert message in str(caught.value)
