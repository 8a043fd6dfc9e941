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


def _hf_cache_with(model_dir: Path, cache: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache laid out as huggingface_hub writes it: models--ORG--NAME/{refs/main, snapshots/REV}."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_hf_model_id_resolves_from_the_local_cache_only(tmp_path):
    from crescent.models.prepare import make_tiny_model

    make_tiny_model(tmp_path / "tiny", layers=1, hidden=32)
    snapshot = _hf_cache_with(tmp_path / "tiny", tmp_path / "hub", "acme/tiny")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from crescent.models.registry import resolve_model_path as r; import sys; print(r(sys.argv[1]))"
    found = subprocess.run([sys.executable, "-c", code, "acme/tiny"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert found.returncode == 0 and Path(found.stdout.strip()) == snapshot, found.stderr
    missing = subprocess.run([sys.executable, "-c", code, "acme/absent"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode != 0 and "local HF cache" in missing.stderr and "never downloads" in missing.stderr


def test_up_takes_the_model_positionally_with_api_key_and_max_model_len(tmp_path):
    """`crescent up ORG/NAME --api-key K --max-model-len N`, as a vllm serve user would type it."""
    import os
    import signal
    import time

    import httpx

    from crescent.models.prepare import make_tiny_model
    from crescent.services.common.launcher import free_port

    make_tiny_model(tmp_path / "tiny", layers=2, hidden=64)
    _hf_cache_with(tmp_path / "tiny", tmp_path / "hub", "acme/tiny")
    port = free_port()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "CRESCENT_TORCH_THREADS": "1",
           "CRESCENT_NUM_KV_BLOCKS": "64", "CRESCENT_DEVICE": "cpu", "CRESCENT_DATA_DIR": str(tmp_path / "kv"),
           "CRESCENT_SSD_CAPACITY_BYTES": "0", "CRESCENT_DRAM_CAPACITY_BYTES": str(16 << 20)}
    proc = subprocess.Popen([sys.executable, "-m", "crescent.cli", "up", "acme/tiny", "--api-key", "sekret",
                             "--max-model-len", "96", "--free-ports", "--port", str(port), "--log-dir",
                             str(tmp_path / "logs")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "crescent up did not come up"
            time.sleep(0.5)
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        auth = {"Authorization": "Bearer sekret"}
        models = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["acme/tiny"]  # served under its HF id, as vllm serve does
        model = "acme/tiny"
        ok = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                        json={"model": model, "prompt": "hello", "max_tokens": 4})
        assert ok.status_code == 200, ok.text
        long = httpx.post(url + "/v1/completions", headers=auth, timeout=60,
                          json={"model": model, "prompt": "hello " * 120, "max_tokens": 4})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded", long.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
