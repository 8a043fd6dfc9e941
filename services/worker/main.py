"""The one entry point of every worker process; its settings class says which role it serves."""

from __future__ import annotations

import importlib
from typing import NamedTuple

from crescent.proto.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from crescent.services.common.run import run_service
from crescent.services.worker.service import WorkerRuntime, run_worker
from crescent.services.worker.settings import WorkerServiceSettings


class RoleSpec(NamedTuple):
    proto_role: int
    service_name: str
    add_servicer: object
    servicer: str  # "module:Class", imported when the role is served


ROLES: dict[str, RoleSpec] = {
    "prefill": RoleSpec(common_pb2.ROLE_PREFILL, "crescent.v1.Prefill", prefill_pb2_grpc.add_PrefillServicer_to_server,
                        "crescent.services.prefill.service:PrefillServicer"),
    "decode": RoleSpec(common_pb2.ROLE_DECODE, "crescent.v1.Decode", decode_pb2_grpc.add_DecodeServicer_to_server,
                       "crescent.services.decode.service:DecodeServicer"),
}


def build(settings: WorkerServiceSettings) -> tuple[WorkerRuntime, RoleSpec, object]:
    """The runtime and gRPC servicer of ``settings.role`` (not started)."""
    if settings.role not in ROLES:
        raise ValueError(f"unknown worker role {settings.role!r}; choose one of {list(ROLES)}")
    spec = ROLES[settings.role]
    module, _, cls = spec.servicer.partition(":")
    runtime = WorkerRuntime(settings, spec.proto_role)
    return runtime, spec, getattr(importlib.import_module(module), cls)(runtime)


def serve(settings: WorkerServiceSettings) -> None:
    """Run a worker until SIGTERM/SIGINT (the process entry point)."""
    runtime, spec, servicer = build(settings)
    run_service(settings.role, settings,
                lambda stop: run_worker(runtime, spec.service_name, spec.add_servicer, servicer, stop),
                metrics_port=settings.metrics_port, fast_exit=True)
