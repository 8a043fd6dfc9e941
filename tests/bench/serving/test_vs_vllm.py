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
    assert disagg.gateway_metrics and "--engine" not in disagg.argv and "CRESCENT_VLLM_KV_CACHE_GIB" not in disagg.env


def test_crescent_argv_with_the_vllm_engine_and_two_workers(tmp_path: Path):
    srv = servers.crescent_server(tmp_path, "m", "agg", "float32", tmp_path, 60, engine="vllm", workers=2,
                                  name="crescent-vllm-agg-2w", vllm_python="/v/bin/python", vllm_kv_cache_gib=4)
    flags = srv.argv[srv.argv.index("up") + 1:]
    assert flags[-8:] == ["--mode", "agg", "--workers", "2", "--engine", "vllm", "--vllm-python", "/v/bin/python"]
    assert srv.env["CRESCENT_VLLM_KV_CACHE_GIB"] == "4" and srv.name == "crescent-vllm-agg-2w"
    assert srv.log_path == tmp_path / "crescent-vllm-agg-2w.log"


def test_vllm_server_gets_the_same_kv_cache_and_dtype(tmp_path: Path):
    srv = servers.vllm_server(tmp_path / "vllm", tmp_path, "m", "float32", 4.0, tmp_path, [])
    assert srv.env["VLLM_CPU_KVCACHE_SPACE"] == "4" and srv.argv[srv.argv.index("--dtype") + 1] == "float32"
    assert not srv.gateway_metrics


def test_engine_picks_the_systems_and_the_result_name():
    args, systems, todo = vs_vllm.parse_args(["--engine", "vllm"])
    assert [s.name for s in systems] == ["crescent-vllm-agg", "crescent-vllm-disagg", "crescent-vllm-agg-2w"]
    assert args.name == "serving_vllm_engine_vs_vllm" and len(todo) == 4
    args, systems, _ = vs_vllm.parse_args([])
    assert [s.name for s in systems] == ["crescent-disagg", "crescent-agg"] and args.name == "serving_vs_vllm"
    args, systems, todo = vs_vllm.parse_args(["--engine", "vllm", "--modes", "agg-2w", "--concurrency", "2",
                                              "--scenarios", "prefix_rep_4x768_c2", "--name", "scratch"])
    assert [(s.mode, s.workers) for s in systems] == [("agg", 2)] and [sc.name for sc in todo] == \
        ["prefix_rep_4x768_c2"] and args.name == "scratch"


@pytest.mark.parametrize("argv", [["--modes", "agg-x"], ["--modes", "disagg-2w"], ["--scenarios", "nope_c8"],
                                  ["--concurrency", "eight"], ["--engine", "sglang"]],
                         ids=["bad-mode", "disagg-workers", "unknown-scenario", "bad-concurrency", "bad-engine"])
def test_bad_arguments_exit_with_a_message(argv: list[str], capsys):
    with pytest.raises(SystemExit) as info:
        vs_vllm.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("use disagg, agg or agg-Nw" in err or "names: random_256_64_c8" in err
                                or "integers" in err or "invalid choice" in err)
