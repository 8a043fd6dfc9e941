"""The conductor's gRPC service: registry, KV events, Place/Finish, on top of the pure core (scheduler.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from crescent.services.common import metrics
from crescent.services.common.grpc_util import GrpcServer, reachable
from crescent.services.common.run import run_service
from crescent.services.conductor import convert
from crescent.services.conductor.cluster import Clock, Placement, Rejection, Request, Role, Slo, WallClock
from crescent.services.conductor.cost_model import CostModel
from crescent.services.conductor.kv_index import KvIndex
from crescent.services.conductor.registry import InstanceIdTaken, Registry
from crescent.services.conductor.scheduler import Conductor
from crescent.services.conductor.settings import ConductorSettings

log = logging.getLogger("crescent.conductor")
SERVICE_NAME = "crescent.v1.Conductor"


def build_conductor(settings: ConductorSettings) -> Conductor:
    cost = CostModel.load(settings.cost_model_path) if settings.cost_model_path else CostModel()
    if settings.redis_url:
        from crescent.services.conductor.mirrored_state import mirrored_state
        from crescent.services.conductor.redis_state import connect

        client = connect(settings.redis_url, settings.redis_password.get_secret_value(), settings.redis_tls,
                         settings.redis_tls_ca_file, settings.redis_tls_cert_file, settings.redis_tls_key_file)
        registry, index, _ = mirrored_state(client, settings.heartbeat_timeout_s, settings.redis_namespace,
                                            settings.redis_retry_s)
    else:
        registry, index = Registry(settings.heartbeat_timeout_s), KvIndex()
    sized_ttft, sized_tbt = cost.sized_slos()
    slo = Slo(ttft_s=settings.ttft_slo_s or sized_ttft, tbt_s=settings.tbt_slo_s or sized_tbt,
              max_queue_per_instance=settings.max_queue_per_instance)
    rejection = settings.rejection
    if rejection == "auto":
        rejection = "predicted" if cost.calibrated else "load"
    log.info("admission: %s rejection, TTFT SLO %.3gs%s, TBT SLO %.3gs%s, %d queued per prefill instance; cost "
             "model: %s", rejection, slo.ttft_s, "" if settings.ttft_slo_s else " (sized)", slo.tbt_s,
             "" if settings.tbt_slo_s else " (sized)", slo.max_queue_per_instance, cost.source)
    metrics.CONDUCTOR_SLO.labels("ttft").set(slo.ttft_s)
    metrics.CONDUCTOR_SLO.labels("tbt").set(slo.tbt_s)
    return Conductor(registry=registry, index=index, cost=cost, policy=settings.policy,  # type: ignore[arg-type]
                     rejection=rejection, slo=slo,
                     kvcache_balancing_threshold=settings.kvcache_balancing_threshold,
                     suspect_after_s=settings.suspect_after_s, stand_in=settings.stand_in)


class ConductorServicer(conductor_pb2_grpc.ConductorServicer):
    def __init__(self, conductor: Conductor, settings: ConductorSettings, clock: Clock) -> None:
        self.c, self.settings, self.clock = conductor, settings, clock

    async def Register(self, request, context):
        try:
            info = convert.info_from_proto(request.instance)
            self.c.registry.register(info, convert.load_from_proto(request.load), self.clock.now())
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except InstanceIdTaken as e:
            log.warning("refused Register from %s: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        log.info("registered %s %s at %s", info.role.name.lower(), info.instance_id, info.address)
        return conductor_pb2.RegisterResponse(heartbeat_interval_s=self.settings.heartbeat_interval_s,
                                              heartbeat_timeout_s=self.settings.heartbeat_timeout_s)

    async def Heartbeat(self, request, context):
        load, now = convert.load_from_proto(request.load), self.clock.now()
        known = self.c.registry.heartbeat(request.instance_id, load, now)
        if known:
            self.c.observe_heartbeat(request.instance_id, load, now)
        return conductor_pb2.HeartbeatResponse(known=known)

    async def Deregister(self, request, context):
        if self.c.registry.deregister(request.instance_id):
            self.c.index.drop_instance(request.instance_id)
            log.info("deregistered %s", request.instance_id)
        return common_pb2.Ack()

    async def ReportKvEvents(self, request, context):
        try:
            events = [convert.kv_event_from_proto(e) for e in request.events]
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for kind, hashes, tier, from_tier in events:
            self.c.index.apply(request.instance_id, kind, hashes, tier, from_tier)
        return common_pb2.Ack()

    def _block_size(self, request) -> int:
        if request.block_size:
            return request.block_size
        workers = [s for s in self.c.registry.instances() if s.info.role != Role.KVSTORE]
        prefill = [s for s in workers if s.info.role in (Role.PREFILL, Role.WORKER)] or workers
        return prefill[0].info.kv_block_size if prefill else 16

    async def Place(self, request, context):
        req = Request(request_id=request.request_id, prompt_tokens=request.prompt_tokens,
                      max_tokens=request.max_tokens, block_hashes=tuple(request.block_hashes),
                      block_size=self._block_size(request), model_id=request.model_id,
                      avoid=tuple(request.avoid_instance_ids))
        try:
            result = self.c.place(req, self.clock.now())
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        _record_placement(result, req, self.c.policy)
        if isinstance(result, Rejection):
            log.debug("refused %s (%d prompt tokens): %s, retry after %.1f s; TTFT correction %.2f", req.request_id,
                      req.prompt_tokens, result.reason, result.retry_after_s, self.c.ledger.ttft_correction)
        return convert.placement_to_proto(result)

    async def Finish(self, request, context):
        ok = request.ok
        self.c.finish(request.request_id, request.completion_tokens if ok else None,
                      request.mean_tbt_s if ok else None, now=self.clock.now(),
                      ttft_s=request.ttft_s if ok else None)
        metrics.CONDUCTOR_CORRECTION.labels("ttft").set(self.c.ledger.ttft_correction)
        metrics.CONDUCTOR_CORRECTION.labels("tbt").set(self.c.ledger.tbt_correction)
        return common_pb2.Ack()

    async def ListInstances(self, request, context):
        now = self.clock.now()
        return conductor_pb2.ListInstancesResponse(
            instances=[convert.status_to_proto(s, now) for s in self.c.registry.instances()])


def _record_placement(result, req: Request, policy: str) -> None:
    if isinstance(result, Placement):
        metrics.CONDUCTOR_PLACEMENTS.labels("accepted", policy).inc()
        metrics.CONDUCTOR_PREDICTED_TTFT.observe(result.predicted_ttft_s)
        metrics.CONDUCTOR_PREFIX_BLOCKS.labels("query").inc(len(req.block_hashes))
        metrics.CONDUCTOR_PREFIX_BLOCKS.labels("hit").inc(result.cached_blocks)
    else:
        metrics.CONDUCTOR_PLACEMENTS.labels("rejected", policy).inc()
        metrics.CONDUCTOR_REJECTIONS.labels(result.reason).inc()


def expire_once(conductor: Conductor, now: float, count_blocks: bool = True, request_ttl_s: float = 1800.0,
                ) -> list[str]:
    """Drop silent instances (and their cached blocks: their KV is gone with them) and requests whose Finish never
    came; refresh gauges."""
    dropped = conductor.registry.expire(now)
    if stale := conductor.ledger.prune(now - request_ttl_s):
        log.warning("forgot %d requests placed over %.0fs ago without Finish", stale, request_ttl_s)
    for info in dropped:
        _forget(conductor, info, f"no heartbeat for {conductor.registry.heartbeat_timeout_s:.1f}s")
    live = conductor.registry.instances()
    for role in Role:
        metrics.CONDUCTOR_INSTANCES.labels(role.name.lower()).set(sum(s.info.role == role for s in live))
    if count_blocks:
        for tier, n in conductor.index.count_by_tier().items():
            metrics.CONDUCTOR_INDEXED_BLOCKS.labels(tier.name.lower()).set(n)
    return [info.instance_id for info in dropped]


def _forget(conductor: Conductor, info, why: str) -> None:
    """An instance is gone: its cached blocks are gone with it."""
    conductor.index.drop_instance(info.instance_id)
    metrics.CONDUCTOR_INSTANCES_DROPPED.labels(info.role.name.lower()).inc()
    log.warning("dropped %s %s: %s", info.role.name.lower(), info.instance_id, why)


async def probe_suspects(conductor: Conductor, now: float, timeout_s: float = 1.0) -> list[str]:
    """Instances silent past ``suspect_after_s`` whose channel is gone (connection refused: the process died) are
    dropped at once instead of after the whole heartbeat timeout; a silent one that still answers is busy and stays
    (it only gets no new work meanwhile)."""
    suspects = [s for s in conductor.registry.instances()
                if now - s.last_heartbeat > conductor.suspect_after_s and s.info.address]
    alive = await asyncio.gather(*(reachable(s.info.address, timeout_s) for s in suspects))
    gone = []
    for state, ok in zip(suspects, alive, strict=True):
        if not ok and conductor.registry.deregister(state.instance_id):
            _forget(conductor, state.info, f"silent for {now - state.last_heartbeat:.1f}s and its address "
                                           f"{state.info.address} refuses connections")
            gone.append(state.instance_id)
    return gone


# Counting indexed blocks walks the whole index (in Redis: every key); once in this many expiry rounds is enough.
_BLOCK_GAUGE_EVERY = 15


async def _expiry_loop(conductor: Conductor, clock: Clock, period_s: float, request_ttl_s: float,
                       stop: asyncio.Event) -> None:
    rounds = 0
    while not stop.is_set():
        try:
            expire_once(conductor, clock.now(), rounds % _BLOCK_GAUGE_EVERY == 0, request_ttl_s)
            await probe_suspects(conductor, clock.now())
            rounds += 1
        except Exception:  # a Redis hiccup must not end the loop (the next round retries)
            log.exception("expiry round failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except asyncio.TimeoutError:
            pass


async def run(settings: ConductorSettings, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None,
              clock: Clock | None = None) -> None:
    clock = clock or WallClock()
    conductor = build_conductor(settings)
    server = GrpcServer(settings.host, settings.port, SERVICE_NAME, internal_token=settings.internal_token_value())
    server.add(conductor_pb2_grpc.add_ConductorServicer_to_server, ConductorServicer(conductor, settings, clock))
    await server.start(serving=True)
    period = min(settings.heartbeat_interval_s, settings.heartbeat_timeout_s / 3)
    expiry = asyncio.create_task(_expiry_loop(conductor, clock, period, settings.request_ttl_s, stop))
    if on_ready:
        on_ready(server.port)
    try:
        await stop.wait()
    finally:
        expiry.cancel()
        await server.stop(grace_s=1.0)


def serve(settings: ConductorSettings) -> None:
    """Run until SIGTERM/SIGINT (blocking)."""
    run_service("conductor", settings, lambda stop: run(settings, stop), metrics_port=settings.metrics_port)


@dataclass
class RunningConductor:
    port: int
    thread: threading.Thread
    _loop: asyncio.AbstractEventLoop
    _stop: asyncio.Event

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout_s)


def run_in_thread(settings: ConductorSettings, timeout_s: float = 10.0, clock: Clock | None = None,
                  ) -> RunningConductor:
    """Start a conductor on a background thread (for tests); ``settings.port=0`` picks a free port."""
    ready = threading.Event()
    box: dict[str, object] = {}

    def target() -> None:
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        box["loop"], box["stop"] = loop, stop

        def on_ready(port: int) -> None:
            box["port"] = port
            ready.set()

        try:
            loop.run_until_complete(run(settings, stop, on_ready, clock))
        except BaseException as e:  # surfaced to the caller below instead of dying silently
            box["error"] = e
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="conductor", daemon=True)
    thread.start()
    if not ready.wait(timeout_s):
        raise TimeoutError(f"conductor did not start within {timeout_s}s")
    if "error" in box:
        raise RuntimeError(f"conductor failed to start: {box['error']}") from box["error"]  # type: ignore[misc]
    return RunningConductor(box["port"], thread, box["loop"], box["stop"])  # type: ignore[arg-type]
