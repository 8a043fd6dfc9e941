"""Best-effort reporting to the conductor: Register, Heartbeat (with store load) and batched KV events.

The store's event sink only appends to a bounded queue (it runs under the store's lock, so it must never
block); a background thread registers, heartbeats every ``heartbeat_interval_s``, and flushes queued events in
batches per model with ``ReportKvEvents``. Any RPC failure is retried with exponential backoff; the data path
never waits on the conductor. If the queue overflows while the conductor is away, the oldest events are
dropped (the conductor's index then misses some blocks, which costs cache hits, never correctness).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

import grpc

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from crescent.services.common import metrics
from crescent.services.common.auth import sync_channel
from crescent.services.common.grpc_util import CHANNEL_OPTIONS
from crescent.services.kvstore.blocks import KvEvent

log = logging.getLogger(__name__)

MAX_QUEUED_EVENTS = 100_000
MAX_BATCH_EVENTS = 1_000


def coalesce(events: list[KvEvent]) -> dict[str, list[conductor_pb2.KvEvent]]:
    """Per model, consecutive events of the same kind and tiers merged into one message."""
    out: dict[str, list[conductor_pb2.KvEvent]] = collections.defaultdict(list)
    for ev in events:
        msgs = out[ev.model_id]
        last = msgs[-1] if msgs else None
        if last is not None and (last.kind, last.tier, last.from_tier) == (ev.kind, ev.tier, ev.from_tier):
            last.block_hashes.extend(ev.block_hashes)
        else:
            msgs.append(
                conductor_pb2.KvEvent(
                    kind=int(ev.kind),
                    block_hashes=ev.block_hashes,
                    tier=int(ev.tier),
                    from_tier=int(ev.from_tier),
                )
            )
    return out


class ConductorReporter:
    def __init__(
        self,
        conductor_address: str,
        instance: conductor_pb2.InstanceInfo,
        load: Callable[[], common_pb2.Load],
        heartbeat_interval_s: float = 2.0,
        rpc_timeout_s: float = 2.0,
        max_backoff_s: float = 10.0,
        internal_token: str = "",
    ):
        self.instance = instance
        self.load = load
        self.heartbeat_interval_s = heartbeat_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self.max_backoff_s = max_backoff_s
        self._channel = sync_channel(conductor_address, internal_token, CHANNEL_OPTIONS)
        self._stub = conductor_pb2_grpc.ConductorStub(self._channel)
        self._queue: collections.deque[KvEvent] = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._registered = False
        self._thread = threading.Thread(target=self._loop, name="kvstore-reporter", daemon=True)

    def sink(self, event: KvEvent) -> None:
        """The store's event sink: O(1), never blocks."""
        self._queue.append(event)
        if len(self._queue) >= MAX_BATCH_EVENTS:
            self._wake.set()

    def start(self) -> ConductorReporter:
        self._thread.start()
        return self

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.rpc_timeout_s * 3)
        if deregister and self._registered:
            try:
                self._stub.Deregister(
                    conductor_pb2.DeregisterRequest(instance_id=self.instance.instance_id),
                    timeout=self.rpc_timeout_s,
                )
            except grpc.RpcError as exc:
                log.info("deregister failed: %s", exc.code())
        self._channel.close()

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                self._step()
                backoff = 0.0
                wait = self.heartbeat_interval_s
            except grpc.RpcError as exc:
                backoff = min(max(backoff * 2, 0.1), self.max_backoff_s)
                wait = backoff
                log.warning("conductor call failed (%s: %s); retrying in %.1fs", exc.code(), exc.details(), backoff)
            self._wake.wait(wait)
            self._wake.clear()
        try:
            self._flush()  # last events before shutting down, best effort
        except grpc.RpcError:
            pass

    def _step(self) -> None:
        if not self._registered:
            self._stub.Register(
                conductor_pb2.RegisterRequest(instance=self.instance, load=self.load()),
                timeout=self.rpc_timeout_s,
            )
            self._registered = True
            log.info("registered with the conductor as %s", self.instance.instance_id)
        reply = self._stub.Heartbeat(
            conductor_pb2.HeartbeatRequest(instance_id=self.instance.instance_id, load=self.load()),
            timeout=self.rpc_timeout_s,
        )
        if not reply.known:
            self._registered = False  # the conductor dropped us: register again on the next step
            return
        self._flush()

    def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH_EVENTS))]
            try:
                for model_id, events in coalesce(batch).items():
                    self._stub.ReportKvEvents(
                        conductor_pb2.KvEventBatch(
                            instance_id=self.instance.instance_id, model_id=model_id, events=events
                        ),
                        timeout=self.rpc_timeout_s,
                    )
            except grpc.RpcError:
                self._queue.extendleft(reversed(batch))  # keep order; resend after the backoff
                metrics.STORE_CLIENT_ERRORS.labels("conductor").inc()
                raise
