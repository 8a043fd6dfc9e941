"""``CrescentConnector``: crescent's kvstore as vLLM's KV connector (vLLM 0.32, ``KVConnectorBase_V1``).

Loading it (the engine does this when it builds vLLM)::

    KVTransferConfig(kv_connector="CrescentConnector",
                     kv_connector_module_path="crescent.services.worker.vllm_connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"internal_token": ..., "timeout_s": 30.0, "block_size": 16,
                                                "conductor_address": "host:port" or "", "instance_id": ...})

``kv_load_failure_policy="recompute"`` matters: vLLM's default ("fail") ends a request whose load failed (a block
evicted between lookup and load), where recomputing the missing blocks is the right answer for a cache.

**kv_connector_extra_config** (``ConnectorConfig``, unknown keys are refused at start): ``internal_token`` (the
cluster's token; the store's data port and the conductor check it), ``timeout_s`` (one store call or conductor RPC),
``block_size`` (tokens per store block: crescent's hashing block, any size; vLLM's page size may differ),
``conductor_address`` (where KV events go; "" = none), ``instance_id`` (the worker's id at the conductor).

**Per-request kv_transfer_params.** In vLLM 0.32 the request-level dict travels in the sampling params:
``SamplingParams(extra_args={"kv_transfer_params": {...}})``; ``vllm.v1.request.Request.__init__`` copies
``sampling_params.extra_args["kv_transfer_params"]`` into ``Request.kv_transfer_params``, which the connector reads
(the OpenAI server does the same with the request body's ``kv_transfer_params``). The keys (``TransferParams``):
``kvstore_address`` ("host:port" of the store's bulk transport; "" = no store), ``kvstore_transport`` ("tcp" or
"mooncake"), ``model_id`` (the block-hash namespace), ``load`` (look the prompt's full blocks up and load the
longest stored prefix: whole blocks, never the prompt's last token), ``save`` (write the prompt's full blocks once
computed; blocks the lookup found stored are not written again). Malformed params never fail the engine: the
request runs without transfers and its report says why (``error``).

**Per-request report.** ``request_finished`` returns a dict that vLLM puts in the finished
``RequestOutput.kv_transfer_params`` (the final output only): ``{"loaded_tokens": n, "stored_blocks": k (blocks this request's saves
wrote), "store_hit_blocks": h (leading blocks the store held at the lookup), "block_hashes": [...] (the prompt's
leading full blocks the store holds after this request), "error": "..." (only when something failed)}``. The worker
saves synchronously in ``wait_for_save``, before the step's output leaves the engine core; if a save fails in the
very step that finishes the request, the report (built when the scheduler sees the finish, before it reads the
worker's results) still counts the ordered blocks: the worker's ``save_errors`` counter and its log say so.

**Counters.** Each half counts (``ConnectorCounters``): ``lookups``, ``lookup_misses``, ``lookup_errors``
(scheduler: requests that asked to load, found nothing to load beyond vLLM's own cache, or could not reach the
store); ``loads``,
``loaded_tokens``, ``load_errors``, ``saves``, ``stored_blocks``, ``save_errors``, ``events_reported`` (worker).
They reach the engine two ways: (1) vLLM's stats path: ``get_kv_connector_stats`` hands the per-step deltas to
vLLM, which sums both halves into ``SchedulerStats.kv_connector_stats`` for the stat loggers of an engine built
with log stats on; ``connector_stat_logger(totals)`` is such a logger: pass it to ``AsyncLLM``/``LLMEngine``
(``stat_loggers=[connector_stat_logger(totals)]``) and ``totals`` (a dict) holds the running sums;
(2) the per-request reports: ``vllm_connector_plan.sum_reports(outputs)`` totals them.

**Where each half runs.** The scheduler half (lookups, orders, reports; vllm_connector_scheduler.py) runs in vLLM's
engine core; it looks the store up (one small request on the transport) each time vLLM asks about a waiting request.
The worker half (vllm_connector_worker.py) runs in vLLM's worker process: it loads before the forward pass of a step
and saves after it, moving tokens through their slots (``block_ids[pos // page_size] * page_size + pos %
page_size``), so crescent's block size and vLLM's page size are independent; the attention kernel's order inside a
page is measured at start (vllm_kv_layout.py). Supported: vLLM's CPU attention backend, ``kv_cache_dtype="auto"``,
tensor and pipeline parallel size 1 (refused otherwise, with the reason).

**Events.** With a conductor address, the blocks the worker saved or loaded are reported as ``KIND_STORED`` in
``TIER_DEVICE`` for ``instance_id`` (``ReportKvEvents``), when vLLM keeps them (prefix caching on; without it a
request's pages are freed when it ends and reporting them would mislead placement). The store reports its own tiers.
vLLM's own prefix cache (what it caches and evicts) reaches the conductor through vLLM's KV events, relayed by
the worker process (services/worker/vllm_kv_events.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.loggers import StatLoggerBase

from crescent.services.worker.vllm_connector_plan import COUNTER_NAMES, ConnectorConfig, LoadSpec, SaveSpec
from crescent.services.worker.vllm_connector_scheduler import ConnectorScheduler
from crescent.services.worker.vllm_connector_worker import ConnectorWorker
from crescent.services.worker.vllm_kv_layout import PageWriter, check_paged_layer, probe_page_layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


@dataclass
class CrescentConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: what to load before the forward and what to save after it."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class CrescentWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: per request, what the loads and saves really did."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, CrescentWorkerMetadata)
        merged = {k: dict(v) for k, v in self.results.items()}
        for req_id, result in other.results.items():
            merged.setdefault(req_id, {}).update(result)
        return CrescentWorkerMetadata(merged)


@dataclass
class CrescentConnectorStats(KVConnectorStats):
    """Counter deltas (``COUNTER_NAMES``) of one interval; both halves' and every worker's are summed."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        total = dict(self.data)
        for name, n in other.data.items():
            total[name] = total.get(name, 0) + n
        return CrescentConnectorStats(data=total)

    def reduce(self) -> dict[str, int | float]:
        return {name: self.data.get(name, 0) for name in COUNTER_NAMES}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class _ConnectorStatLogger(StatLoggerBase):
    """Adds each step's connector counter deltas into a dict the engine owns."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0, totals: dict[str, int] | None = None):
        self.totals = totals if totals is not None else {}

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        for name, n in ((scheduler_stats and scheduler_stats.kv_connector_stats) or {}).items():
            self.totals[name] = self.totals.get(name, 0) + n

    def log_engine_initialized(self) -> None:
        return


def connector_stat_logger(totals: dict[str, int]) -> Callable[[VllmConfig, int], StatLoggerBase]:
    """A vLLM stat-logger factory whose logger keeps the connector's totals (``COUNTER_NAMES``) in ``totals``."""
    return lambda vllm_config, engine_index=0: _ConnectorStatLogger(vllm_config, engine_index, totals)


class CrescentConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            # each rank holds a slice of the heads or layers, and a store block is the whole model's KV
            raise ValueError("CrescentConnector stores whole-model blocks: it needs tensor_parallel_size=1 and "
                             "pipeline_parallel_size=1 (sharded saves are not supported yet)")
        self.scheduler: ConnectorScheduler | None = None
        self.worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = ConnectorScheduler(config, vllm_config.cache_config.block_size)
        else:
            self.worker = ConnectorWorker(config, report_events=bool(vllm_config.cache_config.enable_prefix_caching))

    @property
    def counters(self) -> dict[str, int]:
        """This half's running totals, in its own process (the stats path carries them to the engine)."""
        half = self.scheduler or self.worker
        assert half is not None
        return dict(half.counters.values)

    # -- worker side ----------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        any_layer = next(iter(kv_caches.values()))
        heads, page_size, head_dim = check_paged_layer(any_layer)
        layout = probe_page_layout(self._page_writer(page_size, head_dim, any_layer.dtype), heads, page_size,
                                   head_dim, any_layer.dtype)
        self.worker.register_kv_caches(kv_caches, layout)

    def _page_writer(self, page_size: int, head_dim: int, dtype: torch.dtype) -> PageWriter:
        """The CPU backend's own cache write, with the ISA it picks for these caches (cpu_attn.py)."""
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cache_dtype = self._vllm_config.cache_config.cache_dtype
        if cache_dtype != "auto":
            raise ValueError(f"CrescentConnector stores KV in the model's dtype; kv_cache_dtype={cache_dtype!r} "
                             f"is not supported (leave it 'auto')")
        isa = _get_attn_isa(self._vllm_config.model_config.dtype, page_size, head_dim, cache_dtype)

        def write(key: torch.Tensor, value: torch.Tensor, page: torch.Tensor, slots: torch.Tensor) -> None:
            key_cache, value_cache = page.view(1, page.shape[1], 2 * page_size, head_dim).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0,
                                           v_scale=1.0, kv_cache_dtype=cache_dtype)

        return write

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, CrescentConnectorMetadata) and self.worker is not None
        if meta.loads:
            self.worker.load(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv wrote every layer before the forward began

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # wait_for_save reads all layers at once (a store block holds every layer)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, CrescentConnectorMetadata) and self.worker is not None
        if meta.saves:
            self.worker.save(meta.saves)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.take_failed_block_ids()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        assert self.worker is not None
        results = self.worker.take_results()
        return CrescentWorkerMetadata(results) if results else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        half = self.scheduler or self.worker
        if half is None:
            return None
        if self.worker is not None and self.worker.events is not None:
            events = self.worker.events.reported - self.worker.counters.values["events_reported"]
            self.worker.counters.add("events_reported", events)
        delta = half.counters.delta()
        return CrescentConnectorStats(data=delta) if delta else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return CrescentConnectorStats(data=dict(data or {}))

    # -- scheduler side -------------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self.scheduler.update_state_after_alloc(request, list(block_ids), num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        loads, saves = self.scheduler.build_orders(scheduler_output)
        return CrescentConnectorMetadata(loads=loads, saves=saves)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.scheduler is not None
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, CrescentWorkerMetadata):
            self.scheduler.worker_results(meta.results)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return False, self.scheduler.request_finished(request)

    def shutdown(self) -> None:
        for half in (self.scheduler, self.worker):
            if half is not None:
                half.close()
