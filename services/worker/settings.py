"""Worker settings: the engine's settings plus what a networked worker needs, and one class per role (they
differ only in their default ports and the role they register as)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from crescent.engine.settings import VllmEngineSettings


class WorkerServiceSettings(VllmEngineSettings):
    """The engine's settings plus what a networked worker needs."""

    role: ClassVar[str] = ""
    """prefill, decode or worker (both): which service a process of these settings runs (set by the subclasses)."""

    engine: Literal["crescent", "vllm"] = Field(
        "crescent", description="The engine: crescent's own (MoBA models, hot reload, CPU and GPU) or vLLM's "
        "AsyncLLM in-process (needs the vllm package: run the worker with .venv-vllm's python).")
    port: int = Field(0, description="gRPC port.", ge=0, le=65535)
    metrics_port: int = Field(0, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)
    conductor_address: str = Field("127.0.0.1:50051", description="The conductor's gRPC host:port; empty = none.")
    advertise_host: str = Field("", description="Host others reach this worker at; empty = --host (127.0.0.1 if "
                                                "that is 0.0.0.0).")
    instance_id: str = Field("", description="Unique id at the conductor; empty = ROLE-HOSTNAME-PORT.")
    heartbeat_interval_s: float = Field(1.0, description="Load heartbeat period (the conductor may shorten it).",
                                        gt=0)
    drain_timeout_s: float = Field(30.0, description="On SIGTERM, how long in-flight requests may finish.", ge=0)
    reload_grace_s: float = Field(5.0, description="Decode: after a hot reload, how long the replaced version stays "
                                  "loaded for requests prefilled on it (they continue on it), within "
                                  "drain_timeout_s.", ge=0)
    kvstore_timeout_s: float = Field(30.0, description="Deadline of one batched kvstore transfer.", gt=0)


class PrefillSettings(WorkerServiceSettings):
    """A prefill worker: computes prompts' KV, writes it to the kvstore, returns the first token."""

    role: ClassVar[str] = "prefill"
    port: int = Field(50061, description="gRPC port.", ge=0, le=65535)
    metrics_port: int = Field(9061, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)


class DecodeSettings(WorkerServiceSettings):
    """A decode worker: loads prefilled KV from the kvstore, joins the continuous batch, streams tokens."""

    role: ClassVar[str] = "decode"
    port: int = Field(50071, description="gRPC port.", ge=0, le=65535)
    metrics_port: int = Field(9071, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)


class WorkerSettings(WorkerServiceSettings):
    """An aggregated worker: prefill and decode in one engine. It registers with the conductor as ROLE_WORKER
    (placed for both halves of a request, so the prompt's KV stays in its engine) and still writes each prompt's
    KV to the kvstore and reads prefixes from it."""

    role: ClassVar[str] = "worker"
    port: int = Field(50091, description="gRPC port (Prefill and Decode services).", ge=0, le=65535)
    metrics_port: int = Field(9091, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)
