"""What the prefill and decode services share: settings, engine start-up, conductor link, load metrics, drain.

Lifecycle: bind the gRPC port at once (health NOT_SERVING), load the model in a thread, start the engine loop,
register with the conductor, then SERVING. On SIGTERM: NOT_SERVING and deregister (no new work arrives), wait for
in-flight requests up to ``drain_timeout_s``, stop. A published model directory is watched and hot-reloaded
(reload.py): requests hold the engine they started on (``serving()``), so a swap never changes a running
request's weights or block-hash namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from crescent.engine.interface import BlockKvEngine, Engine
from crescent.engine.outputs import EngineStats
from crescent.engine.sampling_params import SamplingParams
from crescent.proto.v1 import common_pb2, conductor_pb2
from crescent.services.common import metrics as m
from crescent.services.common.grpc_util import GrpcServer
from crescent.services.common.model_watch import watcher_for
from crescent.services.worker.conductor_link import ConductorLink
from crescent.services.worker.kv_transfer import KvTransfer
from crescent.services.worker.reload import load_first, retire, watch_model
from crescent.services.worker.settings import WorkerServiceSettings
from crescent.services.worker.vllm_kv_events import KvEventForwarder, forward_kv_events

log = logging.getLogger(__name__)


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k if p.top_k > 0 else -1,
                          seed=p.seed if p.HasField("seed") else None, max_tokens=max(1, p.max_tokens),
                          min_tokens=p.min_tokens, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                          ignore_eos=p.ignore_eos, logprobs=p.logprobs if p.logprobs >= 0 else None,
                          presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                          repetition_penalty=p.repetition_penalty or 1.0, logit_bias=dict(p.logit_bias),
                          response_format=p.response_format, prior_outputs=p.prior_outputs)


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
        self.engine: Any = None  # the Engine once loaded (the newest version's, for new requests)
        self.model_id = ""  # the block-hash namespace of self.engine (``name@version`` for published models)
        self.served_name = ""  # what the conductor matches requests on: stable across versions
        self.version = ""  # the served published version ("" for a plain model folder)
        self.watcher = watcher_for(settings.model, settings.served_model_name)
        self.in_flight = 0
        self.port = 0  # the bound gRPC port (set before load(): the instance id derives from it)
        self.link: ConductorLink | None = None
        self._seen = {"query": 0, "hit": 0, "preempt": 0}
        self._seen_connector: dict[str, int] = {}
        self._kv: KvTransfer | None = None
        self._users: Counter = Counter()  # AsyncEngine -> requests holding it
        self._retiring: dict[Any, asyncio.Task] = {}  # replaced engines draining their requests
        self._closing: set[Any] = set()  # retiring engines being shut down: no request may take them any more

    def kv_transfer(self, engine: BlockKvEngine | None = None) -> KvTransfer:
        """Moves a block-handoff engine's KV blocks (default: the current one's) to and from the store; rebuilt
        only when a reloaded version's block shape or dtype differs."""
        engine = engine or self.engine
        shape, dtype = engine.kv_block_shape, engine.kv_dtype
        if self._kv is None or (self._kv.block_shape, self._kv.dtype) != (shape, dtype):
            self._kv = KvTransfer(shape, dtype, self.settings.kvstore_timeout_s, self.settings.internal_token_value())
        return self._kv

    async def require_engine(self, context: grpc.aio.ServicerContext) -> Any:
        """The engine, or answer UNAVAILABLE while the model loads."""
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.engine

    @contextlib.asynccontextmanager
    async def serving(self, context: grpc.aio.ServicerContext, kv_model_id: str = "") -> AsyncIterator[Any]:
        """One request's hold on an engine, which a reload drains before shutting it down: the current one, or,
        for a request whose prompt was computed under a replaced version's ``kv_model_id`` (prefilled just
        before this worker swapped), that version while it is still loaded, so one request never mixes
        versions."""
        engine = await self.require_engine(context)
        if kv_model_id and kv_model_id != self.model_id:
            engine = self.retiring_engine(kv_model_id) or engine
        self._users[engine] += 1
        self.in_flight += 1
        try:
            yield engine
        finally:
            self.in_flight -= 1
            self._users[engine] -= 1

    def users_of(self, engine: Any) -> int:
        return self._users[engine]

    def retiring_engine(self, model_id: str) -> Any:
        """The replaced engine of block-hash namespace ``model_id`` if it is still loaded, else None."""
        return next((old for old in self._retiring
                     if old not in self._closing and old.model_id == model_id), None)

    def closing(self, engine: Any) -> None:
        """``engine`` is about to shut down: from now on no request takes it."""
        self._closing.add(engine)

    def forget(self, engine: Any) -> None:
        self._users.pop(engine, None)
        self._retiring.pop(engine, None)
        self._closing.discard(engine)

    async def load(self) -> None:
        from crescent.engine.llm_engine import LLMEngine

        if self.settings.engine == "vllm":
            from crescent.services.worker.engines import start_vllm_engine

            if self.watcher is not None:
                raise ValueError(f"engine=vllm serves a model folder; {self.settings.model} is a published model "
                                 "directory (hot reload), which needs engine=crescent")
            self.install(await start_vllm_engine(self.settings, self.instance_id(self.port)))
        elif self.watcher is None:
            self.install(await asyncio.to_thread(LLMEngine.from_settings, self.settings))
        else:
            self.install(await load_first(self.settings, self.watcher))

    def install(self, engine: Any) -> None:
        """Serve new requests on ``engine`` (an Engine, or crescent's LLMEngine, which is started in an
        AsyncEngine here); a replaced engine drains, then shuts down."""
        from crescent.engine.async_engine import AsyncEngine

        if not isinstance(engine, Engine):
            engine = AsyncEngine(engine).start()
        old, old_version = self.engine, self.version
        step_seconds = m.WORKER_STEP_SECONDS
        role = self.role_name
        engine.observe_steps(lambda kind, seconds, prompt, sampled: step_seconds.labels(role, kind).observe(seconds))
        self.engine = engine
        self.model_id = engine.model_id
        self.served_name = self.watcher.name if self.watcher is not None else engine.model_id
        self.version = self.watcher.version if self.watcher is not None else ""
        self._seen = dict.fromkeys(self._seen, 0)  # the new engine's counters start at zero
        self._seen_connector = {}
        if old_version and old_version != self.version:
            with contextlib.suppress(KeyError):
                m.WORKER_MODEL_VERSION.remove(self.role_name, old_version)
        if self.version:
            m.WORKER_MODEL_VERSION.labels(self.role_name, self.version).set(1)
        log.info("%s engine ready (%s): model %s, %d KV blocks", self.role_name, type(engine).__name__,
                 self.model_id, engine.latest_stats().total_blocks)
        if old is not None:
            # only decode receives requests pinned to a version (prefill's kv_model_id): prefill retires at once
            grace_s = self.settings.reload_grace_s if self.role != common_pb2.ROLE_PREFILL else 0.0
            self._retiring[old] = asyncio.create_task(
                retire(self, old, f"{self.role_name} engine {old.model_id}", self.settings.drain_timeout_s,
                       grace_s))

    async def close_engines(self) -> None:
        """Stop the current engine and any still draining (worker shutdown)."""
        for task in list(self._retiring.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.engine is not None:
            self.engine.shutdown()

    async def load_snapshot(self) -> common_pb2.Load:
        stats: EngineStats = self.engine.latest_stats()  # never waits for a step: a busy worker still beats
        role = self.role_name
        m.WORKER_RUNNING.labels(role).set(stats.running)
        m.WORKER_WAITING.labels(role).set(stats.waiting)
        m.WORKER_KV_USAGE.labels(role).set(stats.kv_usage)
        model = self.served_name
        m.VLLM_RUNNING.labels(model).set(stats.running)
        m.VLLM_WAITING.labels(model).set(stats.waiting)
        m.VLLM_KV_USAGE.labels(model).set(stats.kv_usage)
        for key, now, counter, vllm_counter in (
                ("query", stats.prefix_query_tokens, m.WORKER_PREFIX_QUERIES, m.VLLM_PREFIX_QUERIES),
                ("hit", stats.prefix_hit_tokens, m.WORKER_PREFIX_HITS, m.VLLM_PREFIX_HITS),
                ("preempt", stats.preemptions, m.WORKER_PREEMPTIONS, m.VLLM_NUM_PREEMPTIONS)):
            if now > self._seen[key]:
                counter.labels(role).inc(now - self._seen[key])
                vllm_counter.labels(model).inc(now - self._seen[key])
                self._seen[key] = now
        for name, now in stats.kv_connector.items():
            if now > self._seen_connector.get(name, 0):
                m.WORKER_KV_CONNECTOR.labels(role, name).inc(now - self._seen_connector.get(name, 0))
                self._seen_connector[name] = now
        return common_pb2.Load(waiting=stats.waiting, running=stats.running, free_kv_blocks=stats.free_blocks,
                               total_kv_blocks=stats.total_blocks, queued_prefill_tokens=stats.queued_prefill_tokens,
                               running_context_tokens=stats.running_context_tokens)

    def instance_id(self, port: int) -> str:
        return self.settings.instance_id or f"{self.role_name}-{socket.gethostname()}-{port}"

    def instance_info(self, port: int) -> conductor_pb2.InstanceInfo:
        s = self.settings
        host = s.advertise_host or ("127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host)
        return conductor_pb2.InstanceInfo(instance_id=self.instance_id(port), role=self.role, address=f"{host}:{port}",
                                          model_id=self.served_name, kv_block_size=s.kv_block_size)


Service = tuple[str, Callable[[object, grpc.aio.Server], None], object]
"""(gRPC service name, its add_*_to_server function, the servicer)."""


async def run_worker(runtime: WorkerRuntime, services: list[Service], stop: asyncio.Event,
                     on_ready: Callable[[int], None] | None = None) -> None:
    """Serve ``services`` (one, or Prefill and Decode on an aggregated worker) until ``stop`` is set; then
    drain."""
    s = runtime.settings
    metrics_task: asyncio.Task | None = None
    watch_task: asyncio.Task | None = None
    kv_events: KvEventForwarder | None = None  # a vLLM engine's prefix-cache events, to the conductor
    server = GrpcServer(s.host, s.port, *(name for name, _, _ in services), internal_token=s.internal_token_value())
    for _, add_servicer, servicer in services:
        server.add(add_servicer, servicer)
    await server.start(serving=False)
    runtime.port = server.port
    try:
        await runtime.load()
        if s.conductor_address:
            runtime.link = ConductorLink(s.conductor_address, runtime.instance_info(server.port),
                                         runtime.load_snapshot, s.heartbeat_interval_s,
                                         internal_token=s.internal_token_value())
            await runtime.link.start()
            kv_events = forward_kv_events(runtime.engine, runtime.link, s.kv_block_size, runtime.role_name)
        else:  # standalone: nobody pulls load snapshots, so refresh the metrics here
            metrics_task = asyncio.create_task(_refresh_metrics(runtime, s.heartbeat_interval_s))
        if runtime.watcher is not None and s.model_watch_interval_s > 0:
            watch_task = asyncio.create_task(watch_model(runtime, s.model_watch_interval_s), name="model-watch")
        await server.set_serving(True)
        if on_ready:
            on_ready(server.port)
        await stop.wait()
        if watch_task is not None:  # no swap in the middle of a drain
            watch_task.cancel()
        log.info("draining (%d requests in flight)", runtime.in_flight)
        await server.set_serving(False)  # draining: health says so and the conductor stops placing here
        if runtime.link:
            await runtime.link.stop()
        await _drain(runtime, s.drain_timeout_s)
    finally:
        for task in (metrics_task, watch_task):
            if task is not None:
                task.cancel()
        if kv_events is not None:
            await kv_events.aclose()
        await server.stop(grace_s=1.0)
        await runtime.close_engines()
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
