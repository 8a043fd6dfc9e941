from crescent.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockKey(_message.Message):
    __slots__ = ("model_id", "block_hash", "layer_start", "layer_end")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    block_hash: int
    layer_start: int
    layer_end: int
    def __init__(self, model_id: _Optional[str] = ..., block_hash: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("model_id", "block_hashes", "layer_start", "layer_end")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    layer_start: int
    layer_end: int
    def __init__(self, model_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[int]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("prefix_blocks", "tiers")
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    prefix_blocks: int
    tiers: _containers.RepeatedScalarFieldContainer[_common_pb2.Tier]
    def __init__(self, prefix_blocks: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[_common_pb2.Tier, str]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("dram_bytes_used", "dram_bytes_capacity", "ssd_bytes_used", "ssd_bytes_capacity", "blocks_dram", "blocks_ssd", "data_address", "transport")
    DRAM_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    DRAM_BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SSD_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    SSD_BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DRAM_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SSD_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    dram_bytes_used: int
    dram_bytes_capacity: int
    ssd_bytes_used: int
    ssd_bytes_capacity: int
    blocks_dram: int
    blocks_ssd: int
    data_address: str
    transport: str
    def __init__(self, dram_bytes_used: _Optional[int] = ..., dram_bytes_capacity: _Optional[int] = ..., ssd_bytes_used: _Optional[int] = ..., ssd_bytes_capacity: _Optional[int] = ..., blocks_dram: _Optional[int] = ..., blocks_ssd: _Optional[int] = ..., data_address: _Optional[str] = ..., transport: _Optional[str] = ...) -> None: ...
