"""The kvstore's typed settings (flags ``--field-name``, env ``CRESCENT_FIELD_NAME``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from crescent.settings import CrescentSettings

DEVICE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # as /sys/class/infiniband and ibv_devices list them


def default_data_dir() -> str:
    return str(Path.home() / ".cache" / "crescent" / "kvstore")


class KvStoreSettings(CrescentSettings):
    """The kvstore's settings (env CRESCENT_*, flags --*)."""

    port: int = Field(50081, description="gRPC control-plane port (Lookup, Stats, health); 0 = a free port.")
    data_port: int = Field(50082, description="Bulk data transport port (framed tcp, or mooncake's control).")
    metrics_port: int = Field(9081, description="Prometheus /metrics port; 0 = no metrics endpoint.")
    transport: Literal["tcp", "mooncake"] = Field("tcp", description="Bulk transport: tcp or mooncake.")
    mooncake_protocol: Literal["tcp", "rdma"] = Field(
        "tcp", description="transport=mooncake: how the Transfer Engine moves blocks. rdma only on a node with an "
        "RDMA NIC (the store refuses to start without one); clients use the store's protocol.",
    )
    mooncake_device: str = Field(
        "", description="mooncake_protocol=rdma: the RDMA NICs to use, comma-separated as ibv_devices names them "
        "(mlx5_0,mlx5_1); empty = every RDMA NIC on the node.",
    )
    dram_capacity_bytes: int = Field(1 << 30, ge=0, description="DRAM arena size in bytes (preallocated).")
    ssd_capacity_bytes: int = Field(8 << 30, ge=0, description="SSD tier capacity in bytes; 0 = no SSD tier.")
    data_dir: str = Field(
        default_factory=default_data_dir, description="Directory of the SSD tier's block files."
    )
    block_bytes: int = Field(
        0, ge=0, description="Bytes per block slot; 0 = the size of the first block put."
    )
    dram_prefault: bool = Field(
        True, description="Commit the whole DRAM arena at start (no page faults later)."
    )
    ssd_fsync: bool = Field(True, description="fsync each SSD block before it is published (crash safety).")
    conductor_address: str = Field("", description="Conductor gRPC host:port; empty = standalone.")
    instance_id: str = Field(
        "", description="This store's id at the conductor; empty = kvstore-<host>-<port>."
    )
    advertise_host: str = Field("", description="Host other services use to reach this store; empty = host.")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="Seconds between heartbeats to the conductor.")
    io_timeout_s: float = Field(30.0, gt=0, description="A client stalled mid-frame is dropped after this.")
    drain_timeout_s: float = Field(
        10.0, ge=0, description="On shutdown, how long in-flight transfers may finish."
    )
    shutdown_flush_timeout_s: float = Field(
        30.0, ge=0, description="On shutdown, how long DRAM-only blocks may take to be written to the SSD "
        "tier (so a restart finds them); 0 = no flush. A flush cut short is logged with its counts.",
    )

    @model_validator(mode="after")
    def _mooncake_protocol_fits(self) -> KvStoreSettings:
        if self.transport != "mooncake" and (self.mooncake_protocol != "tcp" or self.mooncake_device):
            raise ValueError("mooncake_protocol and mooncake_device apply to transport=mooncake; "
                             "set transport=mooncake or leave them unset")
        if self.mooncake_device and self.mooncake_protocol != "rdma":
            raise ValueError("mooncake_device names RDMA NICs, used only with mooncake_protocol=rdma; "
                             "set mooncake_protocol=rdma or clear mooncake_device")
        if self.mooncake_device and not all(DEVICE_NAME.match(d) for d in self.mooncake_device.split(",")):
            raise ValueError(f"mooncake_device must be NIC names separated by commas (mlx5_0,mlx5_1), "
                             f"got {self.mooncake_device!r}")
        return self
