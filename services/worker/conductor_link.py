"""A worker's link to the conductor: register, heartbeat its load, report KV events, deregister.

Registration retries until the conductor answers (services start in any order); a heartbeat answered with
``known=False`` (the conductor dropped us, e.g. after a restart) re-registers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from crescent.services.common.auth import aio_channel
from crescent.services.common.grpc_util import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

LoadFn = Callable[[], Awaitable[common_pb2.Load]]


class ConductorLink:
    def __init__(self, conductor_address: str, instance: conductor_pb2.InstanceInfo, load_fn: LoadFn,
                 heartbeat_interval_s: float, rpc_timeout_s: float = 5.0, internal_token: str = ""):
        self.instance = instance
        self.load_fn = load_fn
        self.interval_s = heartbeat_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._channel = aio_channel(conductor_address, internal_token, CHANNEL_OPTIONS)
        self._stub = conductor_pb2_grpc.ConductorStub(self._channel)
        self._task: asyncio.Task | None = None
        self.registered = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="conductor-link")

    async def _register(self) -> bool:
        try:
            reply = await self._stub.Register(conductor_pb2.RegisterRequest(instance=self.instance,
                                                                            load=await self.load_fn()),
                                              timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS):  # not a start-up race
                log.warning("conductor refused the registration (%s: %s); retrying", err.code().name, err.details())
            else:
                log.info("conductor not reachable yet (%s); retrying", err.code().name)
            return False
        if reply.heartbeat_interval_s > 0:
            self.interval_s = min(self.interval_s, reply.heartbeat_interval_s)
        log.info("registered %s as %s", self.instance.instance_id, common_pb2.Role.Name(self.instance.role))
        return True

    async def _loop(self) -> None:
        while True:
            if not self.registered:
                self.registered = await self._register()
            else:
                try:
                    reply = await self._stub.Heartbeat(conductor_pb2.HeartbeatRequest(
                        instance_id=self.instance.instance_id, load=await self.load_fn()), timeout=self.rpc_timeout_s)
                    self.registered = reply.known
                except grpc.aio.AioRpcError as err:
                    log.warning("heartbeat failed: %s", err.code().name)
                except Exception:  # a bad load snapshot must not kill the heartbeat
                    log.exception("heartbeat load snapshot failed")
            await asyncio.sleep(self.interval_s)

    async def report_stored(self, model_id: str, hashes: list[int], tier: int = common_pb2.TIER_DEVICE) -> None:
        """Tell the conductor's KV index which blocks this instance now holds (best effort)."""
        await self.report_kv(conductor_pb2.KvEvent.KIND_STORED, model_id, hashes, tier)

    async def report_evicted(self, model_id: str, hashes: list[int], tier: int = common_pb2.TIER_DEVICE) -> None:
        """Tell the conductor's KV index which blocks this instance no longer holds (best effort)."""
        await self.report_kv(conductor_pb2.KvEvent.KIND_EVICTED, model_id, hashes, tier)

    async def report_kv(self, kind: int, model_id: str, hashes: list[int], tier: int) -> None:
        if not hashes or not self.registered:
            return
        event = conductor_pb2.KvEvent(kind=kind, block_hashes=hashes, tier=tier)
        batch = conductor_pb2.KvEventBatch(instance_id=self.instance.instance_id, model_id=model_id, events=[event])
        try:
            await self._stub.ReportKvEvents(batch, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            log.warning("ReportKvEvents failed: %s", err.code().name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.registered:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._stub.Deregister(conductor_pb2.DeregisterRequest(instance_id=self.instance.instance_id),
                                            timeout=self.rpc_timeout_s)
        await self._channel.close()
