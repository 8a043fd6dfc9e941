"""The service's pieces that need no socket: settings validation, building the core, the expiry round."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from crescent.services.conductor.cluster import InstanceInfo, Load, Role, Tier
from crescent.services.conductor.cost_model import CostModel
from crescent.services.conductor.kv_index import KvEventKind
from crescent.services.conductor.server import build_conductor, expire_once
from crescent.services.conductor.settings import ConductorSettings


def _dropped(role: str) -> float:
    return REGISTRY.get_sample_value("crescent_conductor_instances_dropped_total", {"role": role}) or 0.0


def test_settings_reject_unknown_policy_and_mode():
    with pytest.raises(ValidationError, match="unknown policy"):
        ConductorSettings(policy="fastest")
    with pytest.raises(ValidationError, match="unknown rejection mode"):
        ConductorSettings(rejection="maybe")
    assert ConductorSettings().port == 50051 and ConductorSettings().metrics_port == 9051


def test_build_loads_the_cost_model_file(tmp_path):
    path = tmp_path / "cost.json"
    CostModel(prefill_s=(0.5, 0.0, 0.0), source="test").save(path)
    conductor = build_conductor(ConductorSettings(cost_model_path=str(path), policy="mooncake"))
    assert conductor.cost.prefill_s == (0.5, 0.0, 0.0) and conductor.policy == "mooncake"


def test_expire_once_drops_counts_and_forgets_blocks():
    conductor = build_conductor(ConductorSettings(heartbeat_timeout_s=3.0))
    conductor.registry.register(InstanceInfo("d9", Role.DECODE), Load(), now=0.0)
    conductor.index.apply("d9", KvEventKind.STORED, [1, 2], Tier.DEVICE)
    before = _dropped("decode")
    assert expire_once(conductor, now=1.0) == []
    assert expire_once(conductor, now=5.0) == ["d9"]
    assert _dropped("decode") == before + 1
    assert conductor.index.longest_prefix("d9", [1, 2]) == 0
