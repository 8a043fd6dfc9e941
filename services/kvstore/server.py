"""The kvstore service: the block store, its bulk data server, the gRPC control plane and conductor reporting.

``serve(settings)`` runs it in the foreground until SIGTERM/SIGINT (which drains: health flips to NOT_SERVING,
in-flight transfers finish, DRAM-only blocks are flushed to the SSD tier within a time limit, then it exits);
``run_in_thread(settings)`` starts the same thing in the background for tests and returns a handle. Ports may
be 0 (a free port), which tests use.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading

import grpc

from crescent.proto.v1 import common_pb2, conductor_pb2, kvstore_pb2, kvstore_pb2_grpc
from crescent.services.common.grpc_util import GrpcServer
from crescent.services.common.run import run_service
from crescent.services.kvstore.data_server import DataServer
from crescent.services.kvstore.dir_lock import DataDirLock
from crescent.services.kvstore.events import ConductorReporter
from crescent.services.kvstore.flush import FlushReport, flush_in_background
from crescent.services.kvstore.settings import KvStoreSettings
from crescent.services.kvstore.store import BlockStore
from crescent.services.kvstore.wire import MAX_BLOCKS

log = logging.getLogger(__name__)
SERVICE_NAME = "crescent.v1.KvStore"


class KvStoreServicer(kvstore_pb2_grpc.KvStoreServicer):
    """Answers from the handle's store; UNAVAILABLE while the store is still loading its SSD index."""

    def __init__(self, handle: KvStoreHandle):
        self.handle = handle

    async def _store(self, context) -> BlockStore:
        if self.handle.store is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kvstore is starting")
        return self.handle.store

    async def Lookup(self, request, context):
        store = await self._store(context)
        if len(request.block_hashes) > MAX_BLOCKS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_BLOCKS} hashes per lookup")
        # layer_end 0: any layer range (a block counts when any of its ranges is stored)
        layers = (request.layer_start, request.layer_end) if request.layer_end else None
        if layers is not None and layers[0] >= layers[1]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "layer_start must be below layer_end")
        prefix, tiers = store.lookup(request.model_id, list(request.block_hashes), layers)
        return kvstore_pb2.LookupResponse(prefix_blocks=prefix, tiers=[int(t) for t in tiers])

    async def Stats(self, request, context):
        st = (await self._store(context)).stats()
        return kvstore_pb2.StatsResponse(
            dram_bytes_used=st["dram_bytes_used"],
            dram_bytes_capacity=st["dram_bytes_capacity"],
            ssd_bytes_used=st["ssd_bytes_used"],
            ssd_bytes_capacity=st["ssd_bytes_capacity"],
            blocks_dram=st["blocks_dram"],
            blocks_ssd=st["blocks_ssd"],
            data_address=self.handle.data_address,
            transport=self.handle.settings.transport,
        )


class KvStoreHandle:
    """A running kvstore (gRPC on its own asyncio loop thread, data server threads)."""

    def __init__(self, settings: KvStoreSettings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.store: BlockStore | None = None
        self.data_address = ""
        self.stopped = threading.Event()
        self.reporter: ConductorReporter | None = None
        self.flush_report: FlushReport | None = None
        self.dir_lock = DataDirLock(settings.data_dir)  # held from start() to stop() when there is an SSD tier
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvstore-grpc", daemon=True)

    async def _start_grpc(self) -> None:
        self.grpc = GrpcServer(self.settings.host, self.settings.port, SERVICE_NAME,
                               internal_token=self.settings.internal_token_value())
        self.grpc.add(kvstore_pb2_grpc.add_KvStoreServicer_to_server, KvStoreServicer(self))
        await self.grpc.start(serving=False)  # health answers NOT_SERVING while the store loads

    def start(self) -> KvStoreHandle:
        s = self.settings
        self._thread.start()
        self._call(self._start_grpc())
        self.grpc_address = f"{s.host}:{self.grpc.port}"
        try:
            if s.ssd_capacity_bytes > 0 and s.data_dir:  # before the SSD tier is scanned: its files are ours alone
                self.dir_lock.acquire()
            self.store = BlockStore(
                s.dram_capacity_bytes,
                s.ssd_capacity_bytes,
                s.data_dir,
                s.block_bytes,
                fsync=s.ssd_fsync,
                prefault=s.dram_prefault,
            )
            mooncake = None
            if s.transport == "mooncake":  # inside the try: rdma on a node without the NIC fails here
                from crescent.services.kvstore.mooncake import MooncakeExport

                mooncake = MooncakeExport(self.store, s.advertise_host or s.host, s.mooncake_protocol,
                                          s.mooncake_device)
        except BaseException:
            self.dir_lock.release()
            self._shutdown_grpc()
            raise
        self.data = DataServer(self.store, s.host, s.data_port, s.transport, mooncake, s.io_timeout_s,
                               s.internal_token_value()).start()
        self.data_address = f"{s.advertise_host or s.host}:{self.data.port}"
        if s.conductor_address:
            self.reporter = ConductorReporter(
                s.conductor_address, self._instance_info(), self._load, s.heartbeat_interval_s,
                internal_token=s.internal_token_value(),
            )
            self.store.event_sink = self.reporter.sink
            self.reporter.start()
        self._call(self.grpc.set_serving(True))
        log.info("kvstore ready: gRPC %s, data %s (%s)", self.grpc_address, self.data_address, s.transport)
        return self

    def stop(self) -> None:
        """Drain and stop; idempotent."""
        if self.stopped.is_set():
            return
        self._call(self.grpc.set_serving(False))
        self.data.stop(self.settings.drain_timeout_s)
        if self.settings.shutdown_flush_timeout_s > 0 and self.store.ssd.capacity_bytes > 0:
            # after the drain (no new blocks arrive) and before the reporter stops (the conductor hears
            # where the blocks went)
            self.flush_report = flush_in_background(self.store, self.settings.shutdown_flush_timeout_s)
        if self.reporter is not None:
            self.reporter.stop()
        self._shutdown_grpc()
        if self.flush_report is None or self.flush_report.finished:  # a flush still writing keeps the directory
            self.dir_lock.release()
        self.stopped.set()

    def _shutdown_grpc(self) -> None:
        self._call(self.grpc.stop(grace_s=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def _instance_info(self) -> conductor_pb2.InstanceInfo:
        s = self.settings
        host = s.advertise_host or s.host
        return conductor_pb2.InstanceInfo(
            instance_id=s.instance_id or f"kvstore-{socket.gethostname()}-{self.grpc.port}",
            role=common_pb2.ROLE_KVSTORE,
            address=f"{host}:{self.grpc.port}",
            data_address=self.data_address,
            transport=s.transport,
        )

    def _load(self) -> common_pb2.Load:
        st = self.store.stats()
        return common_pb2.Load(
            store_bytes_used=st["dram_bytes_used"] + st["ssd_bytes_used"],
            store_bytes_capacity=st["dram_bytes_capacity"] + st["ssd_bytes_capacity"],
        )


def run_in_thread(settings: KvStoreSettings) -> KvStoreHandle:
    """Start a kvstore in background threads (tests); call ``handle.stop()`` when done."""
    return KvStoreHandle(settings).start()


def freeze_startup_heap() -> None:
    """For a process that is the kvstore: everything built at start-up (modules, gRPC, the arena, the SSD index)
    lives as long as the process, so move it out of the collector's way; the full collections that a busy
    64 KiB-block put stream triggers (hundreds of records per batch) then no longer walk it (~4% of the server's
    CPU in perf profiles of that stream). Not in ``start()``: a process embedding a store (tests) keeps its heap."""
    gc.freeze()


def serve(settings: KvStoreSettings) -> None:
    """Run the kvstore until SIGTERM or SIGINT, then drain and return."""

    async def main(stop: asyncio.Event) -> None:
        handle = run_in_thread(settings)  # raises DataDirInUse, ValueError, OSError: logged by run_service
        freeze_startup_heap()
        await stop.wait()
        log.info("draining")
        await asyncio.to_thread(handle.stop)

    run_service("kvstore", settings, main, metrics_port=settings.metrics_port)
