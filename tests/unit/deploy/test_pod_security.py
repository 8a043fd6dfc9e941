"""Every pod the chart renders meets the restricted Pod Security Standard and runs with a read-only root."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.unit.deploy.pod_security import restricted_violations
from tests.unit.deploy.scripts import load

examples = load("chart_examples")
CASES = examples.cases()
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# restricted forbids hostPath volumes: serving a node directory is the point of that example.
ALLOWED = {"hostpath-model": {"volumes[models]: type hostPath is not allowed"}}


def pod_templates(name: str) -> list[tuple[str, dict[str, Any]]]:
    docs = examples.manifests(examples.render(examples.load_values(CASES[name])))
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]) for d in docs if d["kind"] in WORKLOAD_KINDS]


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_pods_meet_the_restricted_standard(name):
    templates = pod_templates(name)
    assert templates
    for workload, template in templates:
        found = set(restricted_violations(template["spec"], template["metadata"].get("annotations")))
        assert found <= ALLOWED.get(name, set()), f"{workload}: {sorted(found - ALLOWED.get(name, set()))}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_root_filesystems_are_read_only_with_a_writable_tmp(name):
    for workload, template in pod_templates(name):
        spec = template["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{workload}/{c['name']}"
        if "redis" in workload:
            continue  # Redis writes nothing but its optional /data
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"], workload
        assert {"name": "tmp", "mountPath": "/tmp"} in spec["containers"][0]["volumeMounts"], workload


COMPLIANT: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "app", "image": "x", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "c"}}],
}


def mutated(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(COMPLIANT)
    *parents, leaf = path.split(".")
    node: Any = spec
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[leaf] = value
    return spec


BREACHES = [
    ("hostNetwork", True, "hostNetwork"),
    ("volumes", [{"name": "h", "hostPath": {"path": "/"}}], "type hostPath"),
    ("securityContext.runAsUser", 0, "runAsUser: must not be 0"),
    ("securityContext.runAsNonRoot", False, "runAsNonRoot"),
    ("securityContext.seccompProfile", {"type": "Unconfined"}, "seccompProfile.type"),
    ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}], "not a safe sysctl"),
    ("containers.0.securityContext.privileged", True, "privileged"),
    ("containers.0.securityContext.allowPrivilegeEscalation", True, "allowPrivilegeEscalation"),
    ("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}, "drop: must include ALL"),
    ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}, "only NET_BIND_SERVICE"),
    ("containers.0.securityContext.procMount", "Unmasked", "procMount"),
    ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "hostPort 80"),
    ("initContainers", [{"name": "init", "image": "x"}], "initContainers[init].securityContext.allowPrivilege"),
]


def test_the_check_passes_a_compliant_pod():
    assert restricted_violations(COMPLIANT) == []


@pytest.mark.parametrize("path,value,message", BREACHES, ids=[f"{p}={v}" for p, v, _ in BREACHES])
def test_the_check_names_each_breach(path, value, message):
    found = restricted_violations(mutated(path, value))
    assert any(message in v for v in found), found


def test_seccomp_and_non_root_may_be_set_per_container_instead():
    spec = copy.deepcopy(COMPLIANT)
    del spec["securityContext"]
    assert any("seccompProfile must be set" in v for v in restricted_violations(spec))
    spec["containers"][0]["securityContext"] |= {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert restricted_violations(spec) == []
