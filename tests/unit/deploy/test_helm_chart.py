"""The Helm chart, offline: lint, render every example, validate each object against Kubernetes' schemas."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy.scripts import load

examples = load("chart_examples")
chart_schema = load("chart_schema")

KUBE_VERSION = "1.30"
# Custom resources: kubernetes-validate bundles only the core API's schemas.
CRD_KINDS = {
    "ServiceMonitor": "Prometheus Operator CRD (monitoring.coreos.com), not in the core API schemas",
    "ScaledObject": "KEDA CRD (keda.sh), not in the core API schemas",
    "PrometheusRule": "Prometheus Operator CRD (monitoring.coreos.com), not in the core API schemas",
    "HTTPRoute": "Gateway API CRD (gateway.networking.k8s.io), not in the core API schemas",
}
CASES = examples.cases()


def render_case(name: str) -> list[dict[str, Any]]:
    return examples.manifests(examples.render(examples.load_values(CASES[name])))


def find(docs: list[dict[str, Any]], kind: str, role: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == role]
    assert len(hits) == 1, f"expected one {kind} for {role}, got {len(hits)}"
    return hits[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def env_of(workload: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(workload)["env"]}


def test_expected_examples_exist():
    assert {"default", "calibrated", "multi-conductor", "gpu-workers", "hostpath-model", "monitoring",
            "secure-gateway", "huggingface-model"} <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lint_is_clean(name):
    report = helm.lint(examples.CHART_DIR, examples.load_values(CASES[name]), strict=True,
                       kube_version="v" + KUBE_VERSION + ".0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_object_validates_against_kubernetes(name):
    docs = render_case(name)
    validated = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # reason in CRD_KINDS
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        validated += 1
    assert validated >= 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_services_select_pods_and_name_their_ports(name):
    docs = render_case(name)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matched = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        port_names = {p["name"] for p in container(matched[0])["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names


def test_examples_are_fresh():
    assert examples.main(["--check"]) == 0, "stale: run .venv/bin/python deploy/chart_examples.py"


def test_schema_is_fresh():
    assert chart_schema.SCHEMA_PATH.read_text() == chart_schema.render(), \
        "stale: run .venv/bin/python deploy/chart_schema.py"


def test_default_render_has_every_role_with_probes_and_pdbs():
    docs = render_case("default")
    for role in ("gateway", "conductor", "prefill", "decode"):
        assert container(find(docs, "Deployment", role))["args"] == ["serve", role]
    store = find(docs, "StatefulSet", "kvstore")
    assert store["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert env_of(store)["CRESCENT_DATA_DIR"] == "/data"
    assert container(find(docs, "Deployment", "gateway"))["readinessProbe"]["httpGet"]["path"] == "/health"
    for role, port in (("conductor", 50051), ("prefill", 50061), ("decode", 50071)):
        c = container(find(docs, "Deployment", role))
        assert c["readinessProbe"]["grpc"]["port"] == port and c["startupProbe"]["grpc"]["port"] == port
        assert "tcpSocket" in c["livenessProbe"]  # a draining instance (NOT_SERVING) must not be restarted
    assert container(store)["readinessProbe"]["grpc"]["port"] == 50081
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in docs
            if d["kind"] == "PodDisruptionBudget"} == {"gateway", "conductor", "prefill", "decode", "kvstore"}
    prefill_env = env_of(find(docs, "Deployment", "prefill"))
    assert prefill_env["CRESCENT_CONDUCTOR_ADDRESS"] == "crescent-conductor:50051"
    assert prefill_env["CRESCENT_ADVERTISE_HOST"] == "$(POD_IP)"
    assert prefill_env["CRESCENT_HOST"] == "0.0.0.0"
    assert not any(d["kind"] in CRD_KINDS or d["kind"] == "HorizontalPodAutoscaler" for d in docs)


def test_multi_conductor_uses_bundled_redis():
    docs = render_case("multi-conductor")
    assert find(docs, "Deployment", "conductor")["spec"]["replicas"] == 3
    find(docs, "Deployment", "redis")
    assert find(docs, "Service", "redis")["spec"]["ports"][0]["port"] == 6379
    assert env_of(find(docs, "Deployment", "conductor"))["CRESCENT_REDIS_URL"] == "redis://crescent-redis:6379/0"
    # the bundled Redis requires a password, from a Secret the chart makes; the conductors read the same Secret
    secret = find(docs, "Secret", "redis")
    assert secret["data"]["password"]
    redis_container = find(docs, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis_container["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert redis_container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    conductor_env = find(docs, "Deployment", "conductor")["spec"]["template"]["spec"]["containers"][0]["env"]
    password = next(e for e in conductor_env if e["name"] == "CRESCENT_REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "password"}


def test_external_redis_takes_password_and_tls_from_secrets():
    docs = render_case("pvc-model-external-redis")
    pod = find(docs, "Deployment", "conductor")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["CRESCENT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "crescent-redis", "key": "password"}
    assert env["CRESCENT_REDIS_TLS"]["value"] == "true"
    assert env["CRESCENT_REDIS_TLS_CA_FILE"]["value"] == "/etc/crescent/redis-ca/ca.crt"
    assert {"name": "redis-ca", "secret": {"secretName": "crescent-redis-ca"}} in pod["volumes"]


def test_gpu_workers_request_gpus_and_cuda():
    docs = render_case("gpu-workers")
    for role in ("prefill", "decode"):
        w = find(docs, "Deployment", role)
        assert container(w)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container(w)["image"] == "crescent:0.1.0-cuda"
        assert env_of(w)["CRESCENT_DEVICE"] == "cuda"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            w["spec"]["template"]["spec"]["tolerations"]
    # Helm reads YAML numbers as floats: big byte counts must still reach the service as plain integers.
    assert env_of(find(docs, "Deployment", "decode"))["CRESCENT_KV_CACHE_MEMORY_BYTES"] == "51539607552"
    assert env_of(find(docs, "StatefulSet", "kvstore"))["CRESCENT_SSD_CAPACITY_BYTES"] == "1099511627776"


def test_hostpath_model_is_mounted_and_named():
    docs = render_case("hostpath-model")
    for kind, role in (("Deployment", "gateway"), ("Deployment", "prefill"), ("Deployment", "decode")):
        w = find(docs, kind, role)
        assert env_of(w)["CRESCENT_MODEL"] == "/models/crescent-moba-small"
        assert w["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] == "/mnt/models"
        assert container(w)["volumeMounts"][0] == {"name": "models", "mountPath": "/models", "readOnly": True}
    store = find(docs, "StatefulSet", "kvstore")
    assert "volumeClaimTemplates" not in store["spec"]
    volumes = {v["name"]: v for v in store["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["emptyDir"] == {"sizeLimit": "10Gi"}


def test_monitoring_renders_servicemonitor_hpa_and_keda():
    docs = render_case("monitoring")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}
    hpa = find(docs, "HorizontalPodAutoscaler", "prefill")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "crescent_worker_requests_waiting"
    keda = find(docs, "ScaledObject", "decode")
    assert 'role="decode"' in keda["spec"]["triggers"][0]["metadata"]["query"]
    for role in ("prefill", "decode"):  # the autoscaler owns replicas
        assert "replicas" not in find(docs, "Deployment", role)["spec"]
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    alerts = yaml.safe_load((examples.DEPLOY_DIR / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    board = next(d for d in docs if d["kind"] == "ConfigMap")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads((examples.DEPLOY_DIR / "grafana" / "crescent-dashboard.json").read_text())
    assert json.loads(board["data"]["crescent-dashboard.json"]) == dashboard


def test_settings_become_env_and_win_over_chart_defaults():
    values = {"prefill": {"gpus": 1, "settings": {"device": "cpu", "max_num_seqs": 32, "enable_prefix_caching": False}}}
    env = env_of(find(examples.manifests(examples.render(values)), "Deployment", "prefill"))
    assert env["CRESCENT_DEVICE"] == "cpu"
    assert env["CRESCENT_MAX_NUM_SEQS"] == "32"
    assert env["CRESCENT_ENABLE_PREFIX_CACHING"] == "false"


BAD_VALUES = [
    ({"prefill": {"replicas": -1}}, helm.HelmValuesError, "/prefill/replicas': minimum: got -1, want 0"),
    ({"gatway": {"replicas": 2}}, helm.HelmValuesError, "additional properties 'gatway' not allowed"),
    ({"kvstore": {"transport": "udp"}}, helm.HelmValuesError, "/kvstore/transport': value must be one of"),
    ({"decode": {"port": 70000}}, helm.HelmValuesError, "/decode/port': maximum"),
    ({"gateway": {"resources": {"limits": {"memory": "lots"}}}}, helm.HelmValuesError, "does not match pattern"),
    ({"prefill": {"settings": {"Max-Seqs": 1}}}, helm.HelmValuesError, "invalid propertyName 'Max-Seqs'"),
    ({"model": {"source": "s3"}}, helm.HelmValuesError, "/model/source': value must be one of"),
    ({"slo": {"ttftSeconds": 0, "tbtSeconds": 0.1}}, helm.HelmValuesError, "/slo/ttftSeconds'"),
    ({"conductor": {"replicas": 2}}, helm.HelmRenderError, "set redis.enabled=true (bundled) or conductor.redisUrl"),
    ({"redis": {"enabled": True}, "conductor": {"redisUrl": "redis://r:6379/0"}}, helm.HelmRenderError, "not both"),
    ({"model": {"name": "my-model"}}, helm.HelmRenderError, 'model.name must be "default" when model.source'),
    ({"model": {"source": "hostPath"}}, helm.HelmRenderError, "model.hostPath.path is required"),
    ({"model": {"source": "pvc", "name": "m"}}, helm.HelmRenderError, "set model.pvc.existingClaim"),
    ({"kvstore": {"metricsPort": 50082}}, helm.HelmRenderError, "port 50082 is used twice"),
    ({"decode": {"autoscaling": {"enabled": True}, "keda": {"enabled": True}}}, helm.HelmRenderError,
     "not both"),
    ({"prefill": {"settings": {"kv_block_size": 32}}}, helm.HelmRenderError,
     "kv_block_size must be the same in gateway.settings, prefill.settings and decode.settings"),
    ({"metrics": {"prometheusRule": {"enabled": True}}}, helm.HelmRenderError, "needs metrics.serviceMonitor"),
    ({"kvstore": {"ssdCapacityBytes": 30 * 2**30}}, helm.HelmRenderError,
     "kvstore.ssdCapacityBytes (32212254720) is larger than kvstore.persistence.size (25Gi)"),
    ({"kvstore": {"dramCapacityBytes": 4 * 2**30}}, helm.HelmRenderError,
     "does not fit in kvstore.resources.limits.memory (4Gi)"),
]


@pytest.mark.parametrize("values,error,message", BAD_VALUES, ids=[str(v) for v, _, _ in BAD_VALUES])
def test_bad_values_are_rejected_readably(values, error, message):
    with pytest.raises(error) as caught:
        examples.render(values)
    assert message in str(caught.value)


def test_vllm_workers_render_with_the_engine_and_their_image():
    docs = render_case("vllm-workers")
    for role in ("prefill", "decode"):
        workload = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith(role))
        env = env_of(workload)
        assert env["CRESCENT_ENGINE"] == "vllm" and env["CRESCENT_VLLM_KV_CACHE_GIB"] == "2"
        assert container(workload)["image"].startswith("crescent-vllm:")
    default = next(d for d in render_case("default") if d["kind"] == "Deployment"
                   and d["metadata"]["name"].endswith("prefill"))
    assert "CRESCENT_ENGINE" not in env_of(default)  # crescent's engine is the default


def test_a_calibrated_cost_model_reaches_the_conductor_from_a_config_map():
    from crescent.services.conductor.cost_model import CostModel

    docs = render_case("calibrated")
    conductor = find(docs, "Deployment", "conductor")
    path = env_of(conductor)["CRESCENT_COST_MODEL_PATH"]
    mount = next(m for m in container(conductor)["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in conductor["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    assert CostModel.from_json(config["data"][path.rsplit("/", 1)[1]]).calibrated  # `auto` rejection: predicted
    assert "CRESCENT_COST_MODEL_PATH" not in env_of(find(render_case("default"), "Deployment", "conductor"))
