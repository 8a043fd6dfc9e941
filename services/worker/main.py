"""The one entry point of every worker process; its settings class says which role it serves."""

from __future__ import annotations

import importlib
from typing import NamedTuple

from crescent.proto.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from crescent.services.common.run import run_service
from crescent.services.worker.service import WorkerRuntime, run_worker
from crescent.services.worker.settings import WorkerServiceSettings


class ServiceSpec(NamedTuple):
    service_name: str
    add_servicer: object
    servicer: str  # "module:Class", imported when the role is served


PREFILL = ServiceSpec("crescent.v1.Prefill", prefill_pb2_grpc.add_PrefillServicer_to_server,
                      "crescent.services.prefill.service:PrefillServicer")
DECODE = ServiceSpec("crescent.v1.Decode", decode_pb2_grpc.add_DecodeServicer_to_server,
                     "crescent.services.decode.service:DecodeServicer")


class RoleSpec(NamedTuple):
    proto_role: int
    services: tuple[ServiceSpec, ...]


# A prefill or decode worker also serves the other role's service: the conductor sends it that work only while the
# other role has no live instance (a crash, a restart, a rollout), so one dead process never stops the cluster.
ROLES: dict[str, RoleSpec] = {
    "prefill": RoleSpec(common_pb2.ROLE_PREFILL, (PREFILL, DECODE)),
    "decode": RoleSpec(common_pb2.ROLE_DECODE, (DECODE, PREFILL)),
    # aggregated: both services on one runtime, so a request's decode finds its prompt's KV in the same engine
    "worker": RoleSpec(common_pb2.ROLE_WORKER, (PREFILL, DECODE)),
}


def build(settings: WorkerServiceSettings) -> tuple[WorkerRuntime, list[tuple[ServiceSpec, object]]]:
    """The runtime and the gRPC servicers of ``settings.role`` (not started)."""
    if settings.role not in ROLES:
        raise ValueError(f"unknown worker role {settings.role!r}; choose one of {list(ROLES)}")
    spec = ROLES[settings.role]
    runtime = WorkerRuntime(settings, spec.proto_role)
    servicers = []
    for service in spec.services:
        module, _, cls = service.servicer.partition(":")
        servicers.append((service, getattr(importlib.import_module(module), cls)(runtime)))
    return runtime, servicers


def serve(settings: WorkerServiceSettings) -> None:
    """Run a worker until SIGTERM/SIGINT (the process entry point)."""
    runtime, servicers = build(settings)
    services = [(spec.service_name, spec.add_servicer, servicer) for spec, servicer in servicers]
    run_service(settings.role, settings, lambda stop: run_worker(runtime, services, stop),
                metrics_port=settings.metrics_port, fast_exit=True)
