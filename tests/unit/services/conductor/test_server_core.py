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


def test_auto_admission_predicts_with_a_calibrated_model_and_sizes_the_slos_from_it(tmp_path):
    # A lone 256-token prefill takes 0.1 + 256 * 1e-3 = 0.356 s (10x: 3.56 s), a burst of 32 of them 32 * 0.1 +
    # 8192 * 1e-3 = 11.39 s (1.5x: 17.1 s); a lone decode step at 256 tokens 0.03 + 0.001 + 256 * 1e-5 = 0.03356 s
    # (5x: 0.168 s), a step of the 32 at 1,024 tokens each 0.03 + 0.032 + 32768 * 1e-5 = 0.3897 s (2x: 0.779 s).
    calibrated = CostModel(prefill_s=(0.1, 1e-3, 0.0), decode_step_s=(0.03, 1e-3, 1e-5), source="calibrated: test")
    path = tmp_path / "cost.json"
    calibrated.save(path)
    conductor = build_conductor(ConductorSettings(cost_model_path=str(path)))
    assert conductor.rejection == "predicted"
    assert (conductor.slo.ttft_s, conductor.slo.tbt_s) == (17.0, 0.78)  # the burst binds; two significant digits
    assert REGISTRY.get_sample_value("crescent_conductor_slo_seconds", {"kind": "tbt"}) == 0.78
    pinned = build_conductor(ConductorSettings(cost_model_path=str(path), ttft_slo_s=3.0, rejection="load"))
    assert (pinned.rejection, pinned.slo.ttft_s, pinned.slo.tbt_s) == ("load", 3.0, 0.78)
    default = build_conductor(ConductorSettings())  # the built-in estimate measures nothing: load, fixed SLOs
    assert (default.rejection, default.slo.ttft_s, default.slo.tbt_s) == ("load", 10.0, 0.2)


def test_expire_once_drops_counts_and_forgets_blocks():
    conductor = build_conductor(ConductorSettings(heartbeat_timeout_s=3.0))
    conductor.registry.register(InstanceInfo("d9", Role.DECODE), Load(), now=0.0)
    conductor.index.apply("d9", KvEventKind.STORED, [1, 2], Tier.DEVICE)
    before = _dropped("decode")
    assert expire_once(conductor, now=1.0) == []
    assert expire_once(conductor, now=5.0) == ["d9"]
    assert _dropped("decode") == before + 1
    assert conductor.index.longest_prefix("d9", [1, 2]) == 0
