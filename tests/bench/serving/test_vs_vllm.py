"""The vs-vLLM harness's own parts: server start/stop on a real process, the scenarios, the ratios and goals.

vLLM itself is not needed here (the harness runs it from .venv-vllm); tests/unit/deploy/test_vllm_launcher.py
checks that venv where `make vllm` made it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.serving import servers, vs_vllm

# a /health server that also starts a child, to see that stop() reaches the whole process group
HEALTH_SERVER = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_server_starts_healthy_and_stop_ends_its_children(tmp_path: Path):
    port = servers.free_port()
    srv = servers.Server("toy", [sys.executable, "-c", HEALTH_SERVER, str(port)], port, tmp_path / "toy.log")
    srv.start(start_timeout_s=30)
    try:
        assert httpx.get(srv.base_url + "/health", timeout=5, trust_env=False).text == "ok"
        deadline = time.monotonic() + 10
        while "child" not in srv.log_tail() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(srv.log_tail().split()[1])
        assert _alive(child)
    finally:
        srv.stop(stop_timeout_s=10)
    assert srv.proc.returncode is not None
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_server_that_exits_says_why(tmp_path: Path):
    argv = [sys.executable, "-c", "import sys; print('error: unrecognized arguments: --mode agg'); sys.exit(2)"]
    srv = servers.Server("bad", argv, servers.free_port(), tmp_path / "bad.log")
    with pytest.raises(servers.ServerStartError) as info:
        srv.start(start_timeout_s=30)
    assert info.value.rejected_flag
    assert "unrecognized arguments" in str(info.value)


def test_server_not_healthy_in_time_is_stopped(tmp_path: Path):
    srv = servers.Server("slow", [sys.executable, "-c", "import time; time.sleep(600)"], servers.free_port(),
                         tmp_path / "slow.log")
    t0 = time.monotonic()
    with pytest.raises(servers.ServerStartError, match="not healthy after 2s"):
        srv.start(start_timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert srv.proc.returncode is not None


def test_crescent_argv_per_mode(tmp_path: Path):
    disagg = servers.crescent_server(tmp_path, "m", "disagg", "float32", tmp_path, 60)
    agg = servers.crescent_server(tmp_path, "m", "agg", "auto", tmp_path, 60)
    assert "--mode" not in disagg.argv and disagg.env["CRESCENT_DTYPE"] == "float32"
    assert agg.argv[-2:] == ["--mode", "agg"] and "CRESCENT_DTYPE" not in agg.env
    assert "--host" in disagg.argv and disagg.argv[disagg.argv.index("--host") + 1] == "127.0.0.1"


def test_scenarios_are_the_issue_s_four():
    names = [sc.name for sc in vs_vllm.scenarios([8, 32])]
    assert names == ["random_256_64_c8", "random_256_64_c32", "prefix_rep_4x768_c8", "prefix_rep_4x768_c32"]
    prefix = vs_vllm.scenarios([8])[1]
    args = dict(zip(prefix.dataset_args[::2], prefix.dataset_args[1::2], strict=True))
    assert args == {"--dataset-name": "prefix_repetition", "--prefix-repetition-num-prefixes": "4",
                    "--prefix-repetition-prefix-len": "768", "--prefix-repetition-suffix-len": "64",
                    "--prefix-repetition-output-len": "32"}
    assert prefix.ttft_goal == 0.7


def _run(system: str, scenario: str, tok_s: float, ttft: float, tpot: float, failed: int = 0, repeat: int = 0):
    return {"system": system, "scenario": scenario, "repeat": repeat, "output_throughput": tok_s,
            "median_ttft_ms": ttft, "median_tpot_ms": tpot, "failed": failed}


def test_compare_ratios_and_goals():
    todo = vs_vllm.scenarios([8])
    runs = [_run("vllm", "random_256_64_c8", 100, 200, 50), _run("vllm", "prefix_rep_4x768_c8", 100, 100, 50),
            _run("crescent-disagg", "random_256_64_c8", 120, 150, 40),
            _run("crescent-disagg", "random_256_64_c8", 80, 250, 60, repeat=1),  # median of two repeats
            _run("crescent-disagg", "prefix_rep_4x768_c8", 110, 80, 45, failed=1)]
    out = vs_vllm.compare(runs, todo, ["crescent-disagg"])
    rnd = out["crescent-disagg/random_256_64_c8"]
    assert rnd["ratio_vs_vllm"] == pytest.approx({"output_throughput": 1.0, "median_ttft_ms": 1.0,
                                                  "median_tpot_ms": 1.0})
    assert rnd["meets_all"]
    pre = out["crescent-disagg/prefix_rep_4x768_c8"]
    assert pre["goals"] == {"output_tok_s_ge_1.0x": True, "median_ttft_le_0.7x": False,
                            "median_tpot_le_1.0x": True, "zero_failed": False}
    assert not pre["meets_all"]


def test_compare_skips_a_side_without_finished_runs():
    runs = [_run("crescent-disagg", "random_256_64_c8", 1, 1, 1),
            {**_run("vllm", "random_256_64_c8", None, None, None), "bench_error": "exited 1"}]
    assert vs_vllm.compare(runs, vs_vllm.scenarios([8])[:1], ["crescent-disagg"]) == {}
