"""Every CRESCENT_* variable the chart and docker-compose set is a real setting of that role, with a valid value.

The settings classes are the ones `crescent serve ROLE` builds (crescent.cli.ROLES), so a renamed or
removed setting fails here instead of being silently ignored in a deployment (settings ignore unknown env vars).
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import yaml

from crescent import cli
from tests.unit.deploy.scripts import REPO, load

examples = load("chart_examples")
POD_IP = "10.1.2.3"
# The chart and docker-compose deploy the disaggregated shape; aggregated workers (`crescent serve worker`) run
# under `crescent up --mode agg` only, until the chart gets a mode of its own.
DEPLOYED_ROLES = set(cli.ROLES) - {"worker"}


def settings_class(role: str) -> Any:
    return cli.load(cli.ROLES[role][0])


def chart_env(case: str) -> dict[str, dict[str, str]]:
    """role -> the plain-valued CRESCENT_* env of its workload in a rendered example."""
    docs = examples.manifests(examples.render(examples.load_values(examples.cases()[case])))
    out = {}
    for doc in docs:
        role = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        if doc["kind"] in ("Deployment", "StatefulSet") and role in cli.ROLES:
            env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
            out[role] = {e["name"]: e["value"].replace("$(POD_IP)", POD_IP) for e in env
                         if e["name"].startswith("CRESCENT_") and "value" in e}
    return out


def compose_env() -> dict[str, dict[str, str]]:
    """role -> CRESCENT_* env; a value docker-compose takes from the host (``${NAME:?...}``) is a sample value."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    return {role: {k: re.sub(r"^\$\{\w+[^}]*\}$", "sample-host-value", str(v))
                   for k, v in services[role]["environment"].items()} for role in DEPLOYED_ROLES}


SOURCES = {f"chart:{case}": (lambda c=case: chart_env(c)) for case in ("default", "calibrated", "gpu-workers",
                                                                       "hostpath-model", "multi-conductor",
                                                                       "huggingface-model", "secure-gateway")}
SOURCES["docker-compose"] = compose_env


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_env_names_are_settings_and_values_validate(source, monkeypatch):
    envs = SOURCES[source]()
    assert set(envs) == DEPLOYED_ROLES
    for role, env in envs.items():
        cls = settings_class(role)
        prefix = cls.model_config.get("env_prefix", "")
        unknown = sorted(k for k in env if k[len(prefix):].lower() not in cls.model_fields)
        assert not unknown, f"{source}: {role} has no setting for {unknown}"
        with monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith(prefix)]:
                patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
            settings = cls()  # raises pydantic's ValidationError on a bad value
        assert str(settings.port) == env["CRESCENT_PORT"]
