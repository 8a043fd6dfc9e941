"""The gateway's side of the cluster: Place at the conductor, Prefill, the Decode stream, Finish.

Every gRPC failure becomes an :class:`ApiError` with the HTTP status a client should see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from crescent.proto.v1 import (
    common_pb2,
    conductor_pb2,
    conductor_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from crescent.services.common.grpc_util import ChannelPool
from crescent.services.gateway.errors import ApiError

log = logging.getLogger(__name__)

_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
           grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
           grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404}


def api_error_from_rpc(what: str, err: grpc.aio.AioRpcError) -> ApiError:
    status = _STATUS.get(err.code(), 500)
    return ApiError(status, f"{what} failed: {err.code().name}: {err.details()}",
                    retry_after_s=1.0 if status in (429, 503) else None)


class WorkerLost(ApiError):
    """A prefill or decode worker went away mid-request (its channel broke, or it aborted the request as it shut
    down): the request can resume elsewhere from the tokens already sent."""

    def __init__(self, message: str, instance_id: str):
        super().__init__(503, message, retry_after_s=1.0)
        self.instance_id = instance_id


def _worker_error(what: str, instance_id: str, err: grpc.aio.AioRpcError) -> ApiError:
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return WorkerLost(f"{what} worker {instance_id} lost: {err.details()}", instance_id)
    return api_error_from_rpc(what, err)


@dataclass
class SubRequest:
    """One choice of a request: what the conductor, prefill and decode are told."""

    request_id: str
    model_id: str
    prompt_ids: list[int]
    block_hashes: list[int]
    sampling: common_pb2.SamplingParams
    placement: conductor_pb2.PlaceResponse | None = None
    reused_tokens: int = 0  # prompt tokens prefill did not compute (its own cache or the store)
    started: float = field(default_factory=time.monotonic)
    avoid: list[str] = field(default_factory=list)  # workers that failed this request: placed elsewhere


class ClusterClient:
    """Async gRPC client of the conductor and the workers it places requests on."""

    def __init__(self, conductor_address: str, rpc_timeout_s: float, request_timeout_s: float,
                 block_size: int = 16, internal_token: str = ""):
        self.pool = ChannelPool(internal_token)
        self.block_size = block_size
        self.conductor_address = conductor_address
        self.rpc_timeout_s = rpc_timeout_s
        self.request_timeout_s = request_timeout_s

    def _conductor(self) -> conductor_pb2_grpc.ConductorStub:
        return conductor_pb2_grpc.ConductorStub(self.pool.get(self.conductor_address))

    async def ready(self) -> tuple[bool, str]:
        """Ready = the conductor answers and knows at least one prefill and one decode instance (an aggregated
        worker is both; so is a prefill or decode worker standing in while the other role has none)."""
        try:
            reply = await self._conductor().ListInstances(conductor_pb2.ListInstancesRequest(),
                                                          timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            return False, f"conductor unreachable: {err.code().name}"
        roles = {s.instance.role for s in reply.instances}
        if roles & {common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE}:  # stand-ins: each serves both services
            roles.add(common_pb2.ROLE_WORKER)
        missing = [name for role, name in ((common_pb2.ROLE_PREFILL, "prefill"), (common_pb2.ROLE_DECODE, "decode"))
                   if not roles & {role, common_pb2.ROLE_WORKER}]
        return (not missing), ("no " + " and no ".join(missing) + " instance") if missing else "ready"

    async def place(self, sub: SubRequest, max_tokens: int) -> None:
        request = conductor_pb2.PlaceRequest(request_id=sub.request_id, model_id=sub.model_id,
                                             prompt_tokens=len(sub.prompt_ids), max_tokens=max_tokens,
                                             block_hashes=sub.block_hashes, block_size=self.block_size,
                                             avoid_instance_ids=sub.avoid)
        try:
            reply = await self._conductor().Place(request, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            raise api_error_from_rpc("placement", err) from err
        if not reply.accepted:
            reason = reply.reject_reason or "rejected"
            status = 503 if reason == "no_instance" else 429
            raise ApiError(status, f"the cluster is overloaded ({reason}); retry later", code=reason,
                           retry_after_s=reply.retry_after_s or 1.0)
        sub.placement = reply

    async def finish(self, sub: SubRequest, *, ok: bool, completion_tokens: int, ttft_s: float,
                     mean_tbt_s: float) -> None:
        """Tell the conductor the request left; never raises (the client's answer does not depend on it)."""
        if sub.placement is None:
            return
        request = conductor_pb2.FinishRequest(request_id=sub.request_id, prompt_tokens=len(sub.prompt_ids),
                                              completion_tokens=completion_tokens, ttft_s=ttft_s,
                                              mean_tbt_s=mean_tbt_s, ok=ok)
        try:
            await self._conductor().Finish(request, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            log.warning("Finish(%s) failed: %s", sub.request_id, err.code().name)

    async def generate(self, sub: SubRequest) -> AsyncIterator[decode_pb2.GenerateChunk]:
        """Prefill, then relay the decode stream; cancelling the consumer cancels the decode RPC."""
        place = sub.placement
        assert place is not None, "place() first"
        deadline = sub.started + self.request_timeout_s
        prefill = prefill_pb2_grpc.PrefillStub(self.pool.get(place.prefill.address))
        try:
            first = await prefill.Prefill(prefill_pb2.PrefillRequest(
                request_id=sub.request_id, model_id=sub.model_id, prompt_token_ids=sub.prompt_ids,
                sampling=sub.sampling, kvstore_address=place.kvstore.data_address,
                kvstore_transport=place.kvstore.transport), timeout=_left(deadline))
        except grpc.aio.AioRpcError as err:
            raise _worker_error("prefill", place.prefill.instance_id, err) from err
        sub.reused_tokens = first.cached_tokens + first.loaded_tokens
        if len(first.block_hashes) < len(sub.block_hashes) and place.decode.instance_id != place.prefill.instance_id:
            # The prompt's KV did not reach the store (no store, a store that died or is full): decode where the KV
            # is, on the prefill worker (every worker serves both services), instead of computing the prompt again.
            log.info("%s: %d of %d prompt blocks in the store; decoding on prefill %s", sub.request_id,
                     len(first.block_hashes), len(sub.block_hashes), place.prefill.instance_id)
            place.decode.CopyFrom(place.prefill)
        decode = decode_pb2_grpc.DecodeStub(self.pool.get(place.decode.address))
        request = decode_pb2.GenerateRequest(
            request_id=sub.request_id, model_id=sub.model_id, prompt_token_ids=sub.prompt_ids,
            first_token_id=first.first_token_id, sampling=sub.sampling, block_hashes=first.block_hashes,
            kvstore_address=place.kvstore.data_address, kvstore_transport=place.kvstore.transport,
            kv_model_id=first.kv_model_id)
        if first.HasField("first_logprob"):
            request.first_logprob.CopyFrom(first.first_logprob)
        call = decode.Generate(request, timeout=_left(deadline))
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as err:
            raise _worker_error("decode", place.decode.instance_id, err) from err
        finally:
            call.cancel()  # no-op when finished; on client disconnect it aborts decode's request

    async def close(self) -> None:
        await self.pool.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ApiError(504, "request timed out")
    return left


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
