"""The decode worker process: settings and entry point."""

from __future__ import annotations

from pydantic import Field

from crescent.proto.v1 import common_pb2, decode_pb2_grpc
from crescent.services.common.worker_service import WorkerRuntime, WorkerServiceSettings, serve_blocking

SERVICE_NAME = "crescent.v1.Decode"


class DecodeSettings(WorkerServiceSettings):
    """A decode worker: loads prefilled KV from the kvstore, joins the continuous batch, streams tokens."""

    port: int = Field(50071, description="gRPC port.", ge=0, le=65535)
    metrics_port: int = Field(9071, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)


def build(settings: DecodeSettings):
    from crescent.services.decode.service import DecodeServicer

    runtime = WorkerRuntime(settings, common_pb2.ROLE_DECODE)
    return runtime, DecodeServicer(runtime)


def serve(settings: DecodeSettings) -> None:
    runtime, servicer = build(settings)
    serve_blocking(runtime, SERVICE_NAME, decode_pb2_grpc.add_DecodeServicer_to_server, servicer)
