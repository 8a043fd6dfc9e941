"""CrescentConnector's I/O: kvstore clients (one per store address and transport) and the conductor's KV events.

The scheduler half runs in vLLM's engine core process, the worker half in its worker process, both off crescent's
event loops, so everything here is blocking. Store calls are bounded by the config's ``timeout_s``; events go through a bounded queue drained by one
daemon thread, so a slow or absent conductor never stalls a forward pass (a dropped event costs cache hits, never
correctness, as for the kvstore's own events).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from crescent.services.common.auth import sync_channel
from crescent.services.common.grpc_util import CHANNEL_OPTIONS
from crescent.services.kvstore.client import KvStoreClient

log = logging.getLogger(__name__)

MAX_QUEUED_EVENT_BATCHES = 1024


class StoreClients:
    """Connected kvstore clients, one per (address, transport); each client serializes its own calls."""

    def __init__(self, token: str, timeout_s: float):
        self.token = token
        self.timeout_s = timeout_s
        self._clients: dict[tuple[str, str], KvStoreClient] = {}
        self._lock = threading.Lock()

    def get(self, address: str, transport: str) -> KvStoreClient:
        key = (address, transport)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = KvStoreClient.connect(address, transport=transport, timeout_s=self.timeout_s,
                                               token=self.token)
                self._clients[key] = client
            return client

    def drop(self, address: str, transport: str) -> None:
        """Forget a client after a transport error (the next call reconnects: the store may have restarted)."""
        with self._lock:
            client = self._clients.pop((address, transport), None)
        if client is not None:
            try:
                client.close()
            except Exception:  # a broken connection may fail to close; it is gone either way
                log.debug("closing a failed kvstore client", exc_info=True)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


class KvEventReporter:
    """Reports blocks this worker now holds to the conductor (ReportKvEvents, KIND_STORED), in the background."""

    def __init__(self, conductor_address: str, instance_id: str, token: str, timeout_s: float):
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self.reported = 0  # batches the conductor acknowledged
        self._queue: queue.Queue[tuple[str, list[int]] | None] = queue.Queue(MAX_QUEUED_EVENT_BATCHES)
        self._channel = sync_channel(conductor_address, token, CHANNEL_OPTIONS)
        self._stub = conductor_pb2_grpc.ConductorStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="crescent-kv-events", daemon=True)
        self._thread.start()

    def stored(self, model_id: str, hashes: list[int]) -> None:
        if not hashes:
            return
        try:
            self._queue.put_nowait((model_id, list(hashes)))
        except queue.Full:
            log.warning("conductor KV event queue full: dropped %d block hashes", len(hashes))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._send(*item)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _send(self, model_id: str, hashes: list[int]) -> None:
        event = conductor_pb2.KvEvent(kind=conductor_pb2.KvEvent.KIND_STORED, block_hashes=hashes,
                                      tier=common_pb2.TIER_DEVICE)
        batch = conductor_pb2.KvEventBatch(instance_id=self.instance_id, model_id=model_id, events=[event])
        try:
            self._stub.ReportKvEvents(batch, timeout=self.timeout_s)
            self.reported += 1
        except Exception as err:  # grpc.RpcError mostly; the reporter must outlive any failure
            log.warning("ReportKvEvents to the conductor failed (%s); %d block hashes not reported", err, len(hashes))

    def flush(self, timeout_s: float) -> None:
        """Wait (bounded) until the queued events are sent; for shutdown and tests."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.flush(self.timeout_s)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(self.timeout_s)
        self._channel.close()
