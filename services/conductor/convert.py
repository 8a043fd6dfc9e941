"""Proto <-> conductor dataclasses, with the checks that turn bad input into a clear error (ValueError)."""

from __future__ import annotations

from crescent.proto.v1 import common_pb2, conductor_pb2
from crescent.services.conductor.cluster import (
    InstanceInfo,
    InstanceState,
    Load,
    Placement,
    Rejection,
    Role,
    Tier,
)
from crescent.services.conductor.kv_index import KvEventKind


def info_from_proto(msg: conductor_pb2.InstanceInfo) -> InstanceInfo:
    if not msg.instance_id:
        raise ValueError("instance.instance_id must be non-empty")
    if msg.role not in tuple(Role):
        raise ValueError(f"instance.role must be PREFILL, DECODE, KVSTORE or WORKER, got {msg.role}")
    if msg.role != Role.KVSTORE and msg.kv_block_size == 0:
        raise ValueError("instance.kv_block_size must be positive for a worker")
    return InstanceInfo(instance_id=msg.instance_id, role=Role(msg.role), address=msg.address,
                        data_address=msg.data_address, transport=msg.transport, model_id=msg.model_id,
                        kv_block_size=msg.kv_block_size or 16)


def info_to_proto(info: InstanceInfo) -> conductor_pb2.InstanceInfo:
    return conductor_pb2.InstanceInfo(instance_id=info.instance_id, role=int(info.role), address=info.address,
                                      data_address=info.data_address, transport=info.transport,
                                      model_id=info.model_id, kv_block_size=info.kv_block_size)


def load_from_proto(msg: common_pb2.Load) -> Load:
    return Load(waiting=msg.waiting, running=msg.running, free_kv_blocks=msg.free_kv_blocks,
                total_kv_blocks=msg.total_kv_blocks, queued_prefill_tokens=msg.queued_prefill_tokens,
                running_context_tokens=msg.running_context_tokens, store_bytes_used=msg.store_bytes_used,
                store_bytes_capacity=msg.store_bytes_capacity)


def load_to_proto(load: Load) -> common_pb2.Load:
    return common_pb2.Load(**load.__dict__)


def status_to_proto(state: InstanceState, now: float) -> conductor_pb2.InstanceStatus:
    return conductor_pb2.InstanceStatus(instance=info_to_proto(state.info), load=load_to_proto(state.load),
                                        last_heartbeat_age_s=max(0.0, now - state.last_heartbeat))


def kv_event_from_proto(msg: conductor_pb2.KvEvent) -> tuple[KvEventKind, list[int], Tier, Tier | None]:
    if msg.kind not in (KvEventKind.STORED, KvEventKind.EVICTED, KvEventKind.MOVED):
        raise ValueError(f"KvEvent.kind must be STORED, EVICTED or MOVED, got {msg.kind}")
    if msg.tier not in (Tier.DEVICE, Tier.DRAM, Tier.SSD):
        raise ValueError(f"KvEvent.tier must be DEVICE, DRAM or SSD, got {msg.tier}")
    from_tier = Tier(msg.from_tier) if msg.from_tier in (Tier.DEVICE, Tier.DRAM, Tier.SSD) else None
    if msg.kind == KvEventKind.MOVED and from_tier is None:
        raise ValueError("a MOVED KvEvent needs from_tier")
    return KvEventKind(msg.kind), list(msg.block_hashes), Tier(msg.tier), from_tier


def placement_to_proto(result: Placement | Rejection) -> conductor_pb2.PlaceResponse:
    if isinstance(result, Rejection):
        return conductor_pb2.PlaceResponse(accepted=False, reject_reason=result.reason,
                                           retry_after_s=result.retry_after_s)
    return conductor_pb2.PlaceResponse(
        accepted=True, prefill=info_to_proto(result.prefill.info), decode=info_to_proto(result.decode.info),
        kvstore=info_to_proto(result.kvstore.info) if result.kvstore else None,
        cached_prefix_blocks=result.cached_blocks, predicted_ttft_s=result.predicted_ttft_s,
        predicted_tbt_s=result.predicted_tbt_s, policy=result.policy, replicate_from=result.replicate_from,
        replicate_blocks=result.replicate_blocks)
