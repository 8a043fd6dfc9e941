"""crescent up's engine choice: vLLM workers run with the Python that has vLLM, with --engine vllm; the rest not."""

from __future__ import annotations

import sys

import pytest

from crescent.services.common.launcher import plan_local_cluster, vllm_python


def test_vllm_workers_run_with_the_vllm_python_and_engine_flag(tmp_path):
    python = tmp_path / ".venv-vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    assert vllm_python("", (tmp_path / "elsewhere", tmp_path)) == str(python)
    plan = plan_local_cluster("/m", "m", free_ports=True, mode="agg", engine="vllm", worker_python=str(python))
    by_role = {p.role: p.argv for p in plan.processes}
    assert by_role["worker"][0] == str(python) and by_role["worker"][-2:] == ["--engine", "vllm"]
    for role in ("gateway", "conductor", "kvstore"):  # the front services stay in crescent's own venv
        assert by_role[role][0] == sys.executable and "--engine" not in by_role[role]
    crescent = plan_local_cluster("/m", "m", free_ports=True)
    assert all(p.argv[0] == sys.executable and "--engine" not in p.argv for p in crescent.processes)


def test_a_missing_vllm_python_says_how_to_get_one(tmp_path):
    with pytest.raises(ValueError, match="make vllm"):
        vllm_python("", (tmp_path,))
    with pytest.raises(ValueError, match=str(tmp_path / "nope")):
        vllm_python(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown engine"):
        plan_local_cluster("/m", "m", engine="sglang")
