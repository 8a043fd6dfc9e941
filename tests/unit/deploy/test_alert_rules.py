"""The alert rules under real Prometheus: `promtool check rules` and `promtool test rules` (a firing and a quiet case
per alert), and the chart's PrometheusRule following the chart's SLO values."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from crescent.services.common import metrics as m
from tests.unit.deploy.scripts import DEPLOY, load

examples = load("chart_examples")

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make system: apt-get install prometheus)")

RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
MONITORING = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def chart_groups(slo: dict[str, float] | None = None) -> list[dict]:
    """The rule groups of the chart's PrometheusRule for these SLO values (the chart's defaults when None)."""
    values = {**MONITORING, **({"slo": slo} if slo else {})}
    rules = [d for d in examples.manifests(examples.render(values)) if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1
    return rules[0]["spec"]["groups"]


def alert_names(groups: list[dict]) -> set[str]:
    return {r["alert"] for g in groups for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = alert_names(yaml.safe_load(RULES.read_text())["groups"])
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a quiet case"


def test_deploy_rules_are_the_charts_default_rendering():
    assert yaml.safe_load(RULES.read_text())["groups"] == chart_groups()


def test_chart_bucket_lists_are_the_histograms_buckets():
    helpers = (examples.CHART_DIR / "templates" / "_helpers.tpl").read_text()
    for name, buckets in (("ttftBuckets", m.LATENCY_BUCKETS), ("tbtBuckets", m.TOKEN_GAP_BUCKETS)):
        listed = re.search(r'define "crescent\.' + name + r'" -}}\s*(\[[^\]]*\])', helpers)
        assert listed, f"crescent.{name} not found in _helpers.tpl"
        assert json.loads(listed.group(1)) == [repr(float(b)) for b in buckets]


def fast_burn_case(tmp_path: Path, groups: list[dict], ttft_s: float, fires: bool) -> subprocess.CompletedProcess[str]:
    """promtool test of `groups`: an hour in which every first token took ttft_s seconds pages (fires) or not."""
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    gateway = 'model_name="m", job="gateway", component="gateway", instance="gateway:8000"'
    series = [{"series": f'crescent_gateway_time_to_first_token_seconds_bucket{{le="{le}", {gateway}}}',
               "values": "0+100x70" if float(le) >= ttft_s else "0x70"} for le in ("1.0", "2.0", "+Inf")]
    series.append({"series": f"crescent_gateway_time_to_first_token_seconds_count{{{gateway}}}",
                   "values": "0+100x70"})
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "CrescentTTFTBudgetBurnFast")
    summary = rule["annotations"]["summary"].replace("{{ $value | humanizePercentage }}", "100%")
    expected = [{"exp_labels": {"severity": "page"},
                 "exp_annotations": {"summary": summary, "description": rule["annotations"]["description"]}}]
    test = {"rule_files": ["rules.yml"], "evaluation_interval": "30s",
            "tests": [{"interval": "1m", "input_series": series,
                       "alert_rule_test": [{"alertname": "CrescentTTFTBudgetBurnFast", "eval_time": "65m",
                                            "exp_alerts": expected if fires else []}]}]}
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(test))
    return promtool("test", "rules", tmp_path / "rules_test.yml")


def test_chart_alerts_follow_the_slo_values(tmp_path):
    tight = chart_groups({"ttftSeconds": 1, "tbtSeconds": 0.1})
    exprs = " ".join(r["expr"] for g in tight for r in g["rules"])
    assert 'le="1.0"' in exprs and 'le="0.1"' in exprs and 'le="2.0"' not in exprs and 'le="0.2"' not in exprs
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": tight}))
    checked = promtool("check", "rules", tmp_path / "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # First tokens at 1.5 s miss a 1 s SLO and meet the default 2 s one.
    for groups, fires, summary_slo in ((tight, True, "over 1.0s"), (chart_groups(), False, "over 2.0s")):
        rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "CrescentTTFTBudgetBurnFast")
        assert summary_slo in rule["annotations"]["summary"]
        result = fast_burn_case(tmp_path, groups, ttft_s=1.5, fires=fires)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("slo", [{"ttftSeconds": 1.7, "tbtSeconds": 0.2}, {"ttftSeconds": 2.0, "tbtSeconds": 0.04}])
def test_an_slo_between_bucket_bounds_is_refused(slo):
    with pytest.raises(helm.HelmRenderError, match="is not a bucket bound of crescent_gateway_"):
        examples.render({**MONITORING, "slo": slo})
