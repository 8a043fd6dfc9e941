"""The prefill worker process: settings and entry point."""

from __future__ import annotations

from pydantic import Field

from crescent.proto.v1 import common_pb2, prefill_pb2_grpc
from crescent.services.common.worker_service import WorkerRuntime, WorkerServiceSettings, serve_blocking

SERVICE_NAME = "crescent.v1.Prefill"


class PrefillSettings(WorkerServiceSettings):
    """A prefill worker: computes prompts' KV, writes it to the kvstore, returns the first token."""

    port: int = Field(50061, description="gRPC port.", ge=0, le=65535)
    metrics_port: int = Field(9061, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)


def build(settings: PrefillSettings):
    from crescent.services.prefill.service import PrefillServicer

    runtime = WorkerRuntime(settings, common_pb2.ROLE_PREFILL)
    return runtime, PrefillServicer(runtime)


def serve(settings: PrefillSettings) -> None:
    runtime, servicer = build(settings)
    serve_blocking(runtime, SERVICE_NAME, prefill_pb2_grpc.add_PrefillServicer_to_server, servicer)
