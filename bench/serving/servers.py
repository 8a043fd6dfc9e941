"""Start and stop the two OpenAI servers the vs-vLLM benchmark compares: `crescent up` and `vllm serve`.

Each server runs in its own session (process group) with its log in a file, so a stop reaches every process it
started (crescent's services, vLLM's engine core) and a failed start can say why from the log's tail. Every wait is
bounded: start by ``start_timeout_s``, stop by SIGTERM then SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
# what `crescent up` prints when it rejects a flag's value (argparse)
REJECTED_FLAG = ("unrecognized arguments", "invalid choice")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; ``log_tail`` says why."""

    def __init__(self, message: str, log_tail: str, rejected_flag: bool):
        super().__init__(f"{message}\n--- log tail ---\n{log_tail}")
        self.log_tail = log_tail
        self.rejected_flag = rejected_flag


@dataclass
class Server:
    """One server process (and its children) on 127.0.0.1:``port``."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    gateway_metrics: bool = False  # crescent's gateway: /metrics counts outcomes and rejection reasons
    proc: subprocess.Popen | None = None
    started_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, start_timeout_s: float) -> None:
        """Start, then poll /health until 200; raises ServerStartError (after stopping it) otherwise."""
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, **self.env}, start_new_session=True)
        deadline = t0 + start_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop(5)
                raise ServerStartError(f"{self.name} exited with {self.proc.returncode} before it was healthy",
                                       tail, any(s in tail for s in REJECTED_FLAG))
            if _healthy(self.base_url):
                self.started_s = time.perf_counter() - t0
                return
            time.sleep(1.0)
        tail = self.log_tail()
        self.stop(30)
        raise ServerStartError(f"{self.name} not healthy after {start_timeout_s:.0f}s", tail, False)

    def stop(self, stop_timeout_s: float = 60) -> None:
        """SIGTERM to the whole process group; SIGKILL to what is left after ``stop_timeout_s``."""
        if self.proc is None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.proc.pid, signal.SIGKILL)  # children outliving their parent (engine cores) too
        self.proc.wait(10)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/health", timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def crescent_up_has_mode() -> bool:
    """Whether this checkout's `crescent up` has --mode. Asked of its --help, not by trying: argparse takes an
    unknown ``--mode agg`` as an abbreviation of ``--model`` and would serve a model named "agg"."""
    help_text = subprocess.run([sys.executable, "-m", "crescent.cli", "up", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=120, check=False).stdout
    return "--mode " in help_text or "--mode\n" in help_text


def crescent_server(model_dir: Path, served_name: str, mode: str, dtype: str, log_dir: Path,
                    start_timeout_s: float, *, engine: str = "crescent", workers: int = 1, name: str = "",
                    vllm_python: str = "", vllm_kv_cache_gib: float = 0) -> Server:
    """`crescent up` in ``mode``; the default mode ("disagg"), engine and worker count pass no flag, as a user
    would type it. ``engine="vllm"``: its workers run vLLM from ``vllm_python`` with a KV cache of
    ``vllm_kv_cache_gib`` GiB each (0: the worker's default)."""
    port = free_port()
    name = name or f"crescent-{mode}"
    argv = [sys.executable, "-m", "crescent.cli", "up", "--model", str(model_dir), "--served-model-name",
            served_name, "--host", "127.0.0.1", "--port", str(port), "--free-ports",
            "--log-dir", str(log_dir / name), "--startup-timeout-s", str(start_timeout_s)]
    if mode != "disagg":
        argv += ["--mode", mode]
    if workers != 1:
        argv += ["--workers", str(workers)]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    if engine != "crescent":
        argv += ["--engine", engine] + (["--vllm-python", vllm_python] if vllm_python else [])
        if vllm_kv_cache_gib:
            env["CRESCENT_VLLM_KV_CACHE_GIB"] = f"{vllm_kv_cache_gib:g}"  # each worker's engine (settings)
    if dtype != "auto":
        env["CRESCENT_DTYPE"] = dtype  # every worker reads it (settings: flag > env > default)
    return Server(name, argv, port, log_dir / f"{name}.log", env, gateway_metrics=True)


def vllm_server(vllm_bin: Path, model_dir: Path, served_name: str, dtype: str, kv_cache_gib: float, log_dir: Path,
                extra_args: list[str]) -> Server:
    """`vllm serve` on the same folder; VLLM_CPU_KVCACHE_SPACE set, else start-up may ask for most of the RAM."""
    port = free_port()
    argv = [str(vllm_bin), "serve", str(model_dir), "--served-model-name", served_name, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", dtype, *extra_args]
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return Server("vllm", argv, port, log_dir / "vllm.log", env)
