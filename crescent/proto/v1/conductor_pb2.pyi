from crescent.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceInfo(_message.Message):
    __slots__ = ("instance_id", "role", "address", "data_address", "transport", "model_id", "kv_block_size")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: _common_pb2.Role
    address: str
    data_address: str
    transport: str
    model_id: str
    kv_block_size: int
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., address: _Optional[str] = ..., data_address: _Optional[str] = ..., transport: _Optional[str] = ..., model_id: _Optional[str] = ..., kv_block_size: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("instance", "load")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    load: _common_pb2.Load
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ..., load: _Optional[_Union[_common_pb2.Load, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s", "heartbeat_timeout_s")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("instance_id", "load")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    load: _common_pb2.Load
    def __init__(self, instance_id: _Optional[str] = ..., load: _Optional[_Union[_common_pb2.Load, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("kind", "block_hashes", "tier", "from_tier")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[KvEvent.Kind]
        KIND_STORED: _ClassVar[KvEvent.Kind]
        KIND_EVICTED: _ClassVar[KvEvent.Kind]
        KIND_MOVED: _ClassVar[KvEvent.Kind]
    KIND_UNSPECIFIED: KvEvent.Kind
    KIND_STORED: KvEvent.Kind
    KIND_EVICTED: KvEvent.Kind
    KIND_MOVED: KvEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FROM_TIER_FIELD_NUMBER: _ClassVar[int]
    kind: KvEvent.Kind
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    tier: _common_pb2.Tier
    from_tier: _common_pb2.Tier
    def __init__(self, kind: _Optional[_Union[KvEvent.Kind, str]] = ..., block_hashes: _Optional[_Iterable[int]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., from_tier: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...

class KvEventBatch(_message.Message):
    __slots__ = ("instance_id", "model_id", "events")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model_id: str
    events: _containers.RepeatedCompositeFieldContainer[KvEvent]
    def __init__(self, instance_id: _Optional[str] = ..., model_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[KvEvent, _Mapping]]] = ...) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("request_id", "model_id", "prompt_tokens", "max_tokens", "block_hashes", "block_size", "avoid_instance_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    AVOID_INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_id: str
    prompt_tokens: int
    max_tokens: int
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    block_size: int
    avoid_instance_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., block_hashes: _Optional[_Iterable[int]] = ..., block_size: _Optional[int] = ..., avoid_instance_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PlaceResponse(_message.Message):
    __slots__ = ("accepted", "reject_reason", "retry_after_s", "prefill", "decode", "kvstore", "cached_prefix_blocks", "predicted_ttft_s", "policy", "replicate_from", "replicate_blocks", "predicted_tbt_s")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECT_REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    KVSTORE_FIELD_NUMBER: _ClassVar[int]
    CACHED_PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REPLICATE_FROM_FIELD_NUMBER: _ClassVar[int]
    REPLICATE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TBT_S_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reject_reason: str
    retry_after_s: float
    prefill: InstanceInfo
    decode: InstanceInfo
    kvstore: InstanceInfo
    cached_prefix_blocks: int
    predicted_ttft_s: float
    policy: str
    replicate_from: str
    replicate_blocks: int
    predicted_tbt_s: float
    def __init__(self, accepted: _Optional[bool] = ..., reject_reason: _Optional[str] = ..., retry_after_s: _Optional[float] = ..., prefill: _Optional[_Union[InstanceInfo, _Mapping]] = ..., decode: _Optional[_Union[InstanceInfo, _Mapping]] = ..., kvstore: _Optional[_Union[InstanceInfo, _Mapping]] = ..., cached_prefix_blocks: _Optional[int] = ..., predicted_ttft_s: _Optional[float] = ..., policy: _Optional[str] = ..., replicate_from: _Optional[str] = ..., replicate_blocks: _Optional[int] = ..., predicted_tbt_s: _Optional[float] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "completion_tokens", "ttft_s", "mean_tbt_s", "ok")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_TBT_S_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    mean_tbt_s: float
    ok: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., mean_tbt_s: _Optional[float] = ..., ok: _Optional[bool] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("instance", "load", "last_heartbeat_age_s")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    load: _common_pb2.Load
    last_heartbeat_age_s: float
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ..., load: _Optional[_Union[_common_pb2.Load, _Mapping]] = ..., last_heartbeat_age_s: _Optional[float] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ...) -> None: ...
