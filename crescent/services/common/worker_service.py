"""What the prefill and decode services share: settings, engine start-up, conductor link, load metrics, drain.

Lifecycle: bind the gRPC port at once (health NOT_SERVING), load the model in a thread, start the engine loop,
register with the conductor, then SERVING. On SIGTERM: NOT_SERVING and deregister (no new work arrives), wait for
in-flight requests up to ``drain_timeout_s``, stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import grpc
from pydantic import Field

from crescent.proto.v1 import common_pb2, conductor_pb2
from crescent.services.common import metrics as m
from crescent.services.common.grpc_util import GrpcServer, start_metrics_server
from crescent.services.common.kv_transfer import KvTransfer
from crescent.services.common.logging import setup_logging
from crescent.services.common.worker_link import ConductorLink
from crescent.services.worker.outputs import EngineStats
from crescent.services.worker.sampling_params import SamplingParams
from crescent.services.worker.settings import EngineSettings

log = logging.getLogger(__name__)


class WorkerServiceSettings(EngineSettings):
    """The engine's settings plus what a networked worker needs."""

    port: int = Field(0, description="gRPC port.", ge=0, le=65535)
    metrics_port: int = Field(0, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)
    conductor_address: str = Field("127.0.0.1:50051", description="The conductor's gRPC host:port; empty = none.")
    advertise_host: str = Field("", description="Host others reach this worker at; empty = --host (127.0.0.1 if "
                                                "that is 0.0.0.0).")
    instance_id: str = Field("", description="Unique id at the conductor; empty = ROLE-HOSTNAME-PORT.")
    heartbeat_interval_s: float = Field(1.0, description="Load heartbeat period (the conductor may shorten it).",
                                        gt=0)
    drain_timeout_s: float = Field(30.0, description="On SIGTERM, how long in-flight requests may finish.", ge=0)
    kvstore_timeout_s: float = Field(30.0, description="Deadline of one batched kvstore transfer.", gt=0)


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k if p.top_k > 0 else -1,
                          seed=p.seed if p.HasField("seed") else None, max_tokens=max(1, p.max_tokens),
                          min_tokens=p.min_tokens, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                          ignore_eos=p.ignore_eos, logprobs=p.logprobs if p.logprobs >= 0 else None)


def logprob_to_proto(lp: tuple[int, float, list[tuple[int, float]]]) -> common_pb2.TokenLogprob:
    token_id, logprob, top = lp
    return common_pb2.TokenLogprob(token_id=token_id, logprob=logprob,
                                   top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in top])


class WorkerRuntime:
    """Holds the engine once loaded; counts in-flight requests; turns engine stats into load and metrics."""

    def __init__(self, settings: WorkerServiceSettings, role: int):
        self.settings = settings
        self.role = role
        self.role_name = common_pb2.Role.Name(role).removeprefix("ROLE_").lower()
        self.engine: Any = None  # AsyncEngine once loaded
        self.model_id = ""
        self.in_flight = 0
        self.link: ConductorLink | None = None
        self._seen = {"query": 0, "hit": 0, "preempt": 0}
        self._kv: KvTransfer | None = None

    def kv_transfer(self) -> KvTransfer:
        """Moves this engine's KV blocks to and from the store (built once, on first use)."""
        if self._kv is None:
            engine = self.engine.engine
            cfg = engine.config
            shape = (cfg.num_hidden_layers, 2, engine.block_manager.block_size, cfg.num_key_value_heads,
                     cfg.head_dim)
            self._kv = KvTransfer(shape, engine.runner.dtype, self.settings.kvstore_timeout_s)
        return self._kv

    async def require_engine(self, context: grpc.aio.ServicerContext) -> Any:
        """The engine, or answer UNAVAILABLE while the model loads."""
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.engine

    async def load(self) -> None:
        from crescent.services.worker.async_engine import AsyncEngine
        from crescent.services.worker.engine import LLMEngine

        engine = await asyncio.to_thread(LLMEngine.from_settings, self.settings)
        self.model_id = engine.model_id
        self.engine = AsyncEngine(engine).start()
        log.info("%s engine ready: model %s, %d KV blocks of %d tokens", self.role_name, self.model_id,
                 engine.block_manager.num_blocks, engine.block_manager.block_size)

    async def load_snapshot(self) -> common_pb2.Load:
        stats: EngineStats = await self.engine.call(lambda e: e.stats())
        role = self.role_name
        m.WORKER_RUNNING.labels(role).set(stats.running)
        m.WORKER_WAITING.labels(role).set(stats.waiting)
        m.WORKER_KV_USAGE.labels(role).set(stats.kv_usage)
        for key, now, counter in (("query", stats.prefix_query_tokens, m.WORKER_PREFIX_QUERIES),
                                  ("hit", stats.prefix_hit_tokens, m.WORKER_PREFIX_HITS),
                                  ("preempt", stats.preemptions, m.WORKER_PREEMPTIONS)):
            if now > self._seen[key]:
                counter.labels(role).inc(now - self._seen[key])
                self._seen[key] = now
        return common_pb2.Load(waiting=stats.waiting, running=stats.running, free_kv_blocks=stats.free_blocks,
                               total_kv_blocks=stats.total_blocks, queued_prefill_tokens=stats.queued_prefill_tokens,
                               running_context_tokens=stats.running_context_tokens)

    def instance_info(self, port: int) -> conductor_pb2.InstanceInfo:
        s = self.settings
        host = s.advertise_host or ("127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host)
        instance_id = s.instance_id or f"{self.role_name}-{socket.gethostname()}-{port}"
        return conductor_pb2.InstanceInfo(instance_id=instance_id, role=self.role, address=f"{host}:{port}",
                                          model_id=self.model_id, kv_block_size=s.kv_block_size)


async def run_worker(runtime: WorkerRuntime, service_name: str,
                     add_servicer: Callable[[object, grpc.aio.Server], None], servicer: object,
                     stop: asyncio.Event, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until ``stop`` is set; then drain."""
    s = runtime.settings
    metrics_task: asyncio.Task | None = None
    server = GrpcServer(s.host, s.port, service_name)
    server.add(add_servicer, servicer)
    await server.start(serving=False)
    try:
        await runtime.load()
        if s.conductor_address:
            runtime.link = ConductorLink(s.conductor_address, runtime.instance_info(server.port),
                                         runtime.load_snapshot, s.heartbeat_interval_s)
            await runtime.link.start()
        else:  # standalone: nobody pulls load snapshots, so refresh the metrics here
            metrics_task = asyncio.create_task(_refresh_metrics(runtime, s.heartbeat_interval_s))
        await server.set_serving(True)
        if on_ready:
            on_ready(server.port)
        await stop.wait()
        log.info("draining (%d requests in flight)", runtime.in_flight)
        await server.set_serving(False)  # draining: health says so and the conductor stops placing here
        if runtime.link:
            await runtime.link.stop()
        await _drain(runtime, s.drain_timeout_s)
    finally:
        if metrics_task is not None:
            metrics_task.cancel()
        await server.stop(grace_s=1.0)
        if runtime.engine is not None:
            runtime.engine.shutdown()
        log.info("stopped")


async def _refresh_metrics(runtime: WorkerRuntime, period_s: float) -> None:
    while True:
        try:
            await runtime.load_snapshot()
        except Exception:  # metrics must never take the worker down
            log.exception("load snapshot failed")
        await asyncio.sleep(period_s)


async def _drain(runtime: WorkerRuntime, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while runtime.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if runtime.in_flight:
        log.warning("drain timeout: %d requests still in flight", runtime.in_flight)


def serve_blocking(runtime: WorkerRuntime, service_name: str, add_servicer, servicer) -> None:
    """Run a worker until SIGTERM/SIGINT (the process entry point)."""
    s = runtime.settings
    setup_logging(runtime.role_name, s.log_level)
    start_metrics_server(s.host, s.metrics_port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(runtime, service_name, add_servicer, servicer, stop)

    try:
        asyncio.run(main())
    except Exception as exc:  # e.g. the model cannot be loaded: one clear line, not a traceback
        log.error("%s worker failed: %s: %s", runtime.role_name, type(exc).__name__, exc)
        logging.shutdown()
        os._exit(1)
    # Everything is closed by now; the interpreter's own teardown (torch and friends) takes seconds on a busy
    # machine and would stall `crescent up`'s ordered shutdown, so leave at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
