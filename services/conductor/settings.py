"""The conductor's typed settings (flags ``--field-name``, env ``CRESCENT_FIELD_NAME``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from crescent.services.conductor.policies import get_policy
from crescent.services.conductor.rejection import REJECTION_MODES
from crescent.settings import CrescentSettings, read_secret_file


class ConductorSettings(CrescentSettings):
    """The global scheduler: registry, KV block index, placement policy and early rejection."""

    port: int = Field(50051, description="gRPC port.", ge=0, le=65535)
    metrics_port: int = Field(9051, description="Prometheus /metrics port; 0 = none.", ge=0, le=65535)
    policy: str = Field("cache_aware", description="round_robin, least_loaded, cache_aware or mooncake.")
    rejection: str = Field(
        "auto", description="Early rejection: none, load, predicted (the queue cap always applies), or auto: "
        "predicted when cost_model_path holds a calibrated model (``crescent calibrate``), load otherwise.")
    ttft_slo_s: float = Field(
        0.0, description="Time-to-first-token SLO the rejection modes protect; 0 = sized from the cost model when "
        "calibrated: the larger of 10x a lone 256-token prefill (at least 1 s) and 1.5x one instance's prefill of 32 "
        "such prompts at once (cost_model.py); else 10 s.", ge=0)
    tbt_slo_s: float = Field(
        0.0, description="Time-between-tokens SLO the rejection modes protect (on a request's slowest gaps); 0 = "
        "sized from the cost model when calibrated: the larger of 5x a lone decode step at 256 tokens of context and "
        "2x the slowest step of a batch of 32 such requests (cost_model.py); else 0.2 s.",
        ge=0)
    max_queue_per_instance: int = Field(64, description="Queued requests per prefill instance before 429.", ge=1)
    heartbeat_interval_s: float = Field(1.0, description="How often instances are told to heartbeat.", gt=0)
    heartbeat_timeout_s: float = Field(
        15.0, description="Instances silent this long are dropped (with their KV index entries). Workers beat from "
        "a snapshot, never waiting for an engine step, so this only has to outlast a stalled process or network.",
        gt=0)
    suspect_after_s: float = Field(
        0.0, description="Instances silent this long get no new work (requests already placed go on) until they "
        "beat again or are dropped; 0 = 3 heartbeat intervals (at most half the timeout).", ge=0)
    stand_in: bool = Field(
        True, description="While a role has no live instance (a crash, a restart), place its work on the other "
        "role's workers: every prefill and decode worker serves both services. Off: such requests get 503.")
    cost_model_path: str = Field("", description="Cost model JSON (from calibrate); empty = built-in defaults.")
    request_ttl_s: float = Field(1800.0, description="Forget an admitted request after this long without Finish.",
                                 gt=0)
    redis_url: str = Field("", description="redis://host:port/db to share state between replicas; empty = memory.")
    redis_namespace: str = Field("crescent", description="Key prefix in Redis (one per cluster).")
    redis_password: SecretStr = Field(
        SecretStr(""), description="Redis AUTH password (overrides one in redis_url). Prefer the env var or "
        "redis_password_file: a flag shows in the process list.")
    redis_password_file: str = Field("", description="A file holding redis_password (a mounted Kubernetes Secret).")
    redis_tls: bool = Field(False, description="Connect to Redis over TLS (as a rediss:// URL does).")
    redis_tls_ca_file: str = Field("", description="CA bundle that signed the Redis server's certificate; empty = "
                                   "the system's CAs.")
    redis_tls_cert_file: str = Field("", description="Client certificate, when Redis requires one (tls-auth-clients).")
    redis_tls_key_file: str = Field("", description="The client certificate's private key.")
    redis_retry_s: float = Field(
        1.0, description="While Redis does not answer, the conductor serves from its own copy of the state and "
        "probes Redis this often; when it answers again, the copy is written back.", gt=0)
    kvcache_balancing_threshold: float = Field(
        2.0, description="mooncake: fetch another instance's prefix when it is this many times longer.", gt=1)

    @model_validator(mode="after")
    def _suspect_before_drop(self) -> ConductorSettings:
        if self.suspect_after_s == 0:
            self.suspect_after_s = min(3 * self.heartbeat_interval_s, self.heartbeat_timeout_s / 2)
        if self.suspect_after_s >= self.heartbeat_timeout_s:
            raise ValueError(f"suspect_after_s ({self.suspect_after_s}) must be below heartbeat_timeout_s "
                             f"({self.heartbeat_timeout_s}): raise the timeout or lower suspect_after_s")
        return self

    @model_validator(mode="after")
    def _redis_secrets(self) -> ConductorSettings:
        if self.redis_password_file:
            if self.redis_password.get_secret_value():
                raise ValueError("set redis_password or redis_password_file, not both")
            self.redis_password = SecretStr(read_secret_file(self.redis_password_file, "redis_password_file"))
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            raise ValueError("redis_tls_cert_file and redis_tls_key_file go together")
        for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path}")
        return self

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        get_policy(v)  # raises ValueError naming the choices
        return v

    @field_validator("rejection")
    @classmethod
    def _known_rejection(cls, v: str) -> str:
        if v != "auto" and v not in REJECTION_MODES:
            raise ValueError(f"unknown rejection mode {v!r}; choose one of {['auto', *REJECTION_MODES]}")
        return v
