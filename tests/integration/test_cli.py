"""The `crescent` command's dispatch: usage errors, serve flags from settings, delegation to model/train."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crescent import cli

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crescent.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_usage_and_unknown_commands():
    assert cli.main(["--help"]) == 0
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["serve", "nonsense"]) == 2


@pytest.mark.parametrize("role", ["gateway", "conductor", "kvstore", "prefill", "decode", "worker"])
def test_serve_help_lists_every_setting(role):
    settings_cls = cli.load(cli.ROLES[role][0])
    out = _run("serve", role, "--help")
    assert out.returncode == 0, out.stderr
    for name in settings_cls.model_fields:
        assert "--" + name.replace("_", "-") in out.stdout


def test_invalid_setting_is_a_clear_error_not_a_traceback():
    out = _run("serve", "gateway", "--port", "not-a-port")
    assert out.returncode == 2 and "invalid settings" in out.stderr and "port" in out.stderr


def test_model_subcommand_is_delegated(tmp_path):
    out = _run("model", "tiny", str(tmp_path / "tiny"), "--layers", "1", "--hidden", "32", "--heads", "2",
               "--kv-heads", "1")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tiny" / "config.json").is_file()


def test_up_plan_uses_one_model_id_everywhere():
    from crescent.services.common.launcher import plan_local_cluster

    plan = plan_local_cluster("/models/m", "m", gateway_port=18000, decode=2, free_ports=True)
    roles = [p.role for p in plan.processes]
    assert roles == ["conductor", "kvstore", "prefill", "decode", "decode", "gateway"]
    for p in plan.processes:
        if p.role in ("prefill", "decode", "gateway"):
            assert p.argv[p.argv.index("--served-model-name") + 1] == "m"
            assert p.argv[p.argv.index("--conductor-address") + 1] == plan.conductor_address
    assert len({p.address for p in plan.processes}) == len(plan.processes)


def test_up_plan_agg_starts_aggregated_workers_and_disagg_stays_the_default():
    from crescent.services.common.launcher import plan_local_cluster

    plan = plan_local_cluster("/models/m", "m", gateway_port=18000, mode="agg", workers=2, free_ports=True)
    assert [p.role for p in plan.processes] == ["conductor", "kvstore", "worker", "worker", "gateway"]
    worker = plan.processes[2]
    assert worker.argv[worker.argv.index("serve") + 1] == "worker"
    assert worker.argv[worker.argv.index("--conductor-address") + 1] == plan.conductor_address
    fixed = plan_local_cluster("/models/m", "m", mode="agg")
    assert fixed.processes[2].address == "127.0.0.1:50091"
    assert "worker" not in [p.role for p in plan_local_cluster("/models/m", "m", free_ports=True).processes]
    with pytest.raises(ValueError, match="at least one"):
        plan_local_cluster("/models/m", "m", mode="agg", workers=0)
    with pytest.raises(ValueError, match="mode"):
        plan_local_cluster("/models/m", "m", mode="both")
    assert cli._up_parser().parse_args([]).mode == "disagg"
