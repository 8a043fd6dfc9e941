"""VllmEngine: vLLM's v1 ``AsyncLLM`` in-process behind crescent's engine interface (interface.py).

vLLM runs its engine core in its own process (scheduler, forward passes); this object is its front end in the
worker's event loop: requests go in as token ids, outputs come back as crescent's ``RequestOutput`` deltas.
Nothing here runs a forward pass on the event loop, so heartbeats and health answer while vLLM computes.

KV hand-off: with ``CrescentConnector`` configured (``kv_handoff == "connector"``) each request carries its
``StoreParams`` as vLLM's ``kv_transfer_params`` (``SamplingParams.extra_args``) and the connector loads and saves
blocks inside vLLM; without it (``"none"``) KV stays in vLLM's own prefix cache.

KV-cache events: given an ``ipc://`` endpoint, vLLM publishes the pages its prefix cache stores and evicts there
(``KVEventsConfig``, zmq); the worker relays them to the conductor (services/worker/vllm_kv_events.py).

Load figures come from vLLM itself: a stat logger receives its ``SchedulerStats`` (running, waiting, KV usage,
prefix-cache queries and hits) after each step; vLLM's own Prometheus logger is off because the worker already
exports the same ``vllm:`` names from these figures (services/common/metrics.py).

Needs the ``vllm`` package (``make vllm``: .venv-vllm); importing this module without it is fine, starting is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from crescent.engine.async_engine import EngineError
from crescent.engine.detokenizer import IncrementalDetokenizer
from crescent.engine.interface import KvHandoff, StepObserver, StoreParams
from crescent.engine.outputs import EngineStats, RequestOutput
from crescent.engine.sampling_params import SamplingParams
from crescent.engine.settings import VllmEngineSettings
from crescent.engine.vllm_params import logprobs_from_vllm, sampling_kwargs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectorSpec:
    """vLLM's ``KVTransferConfig`` for a KV connector loaded by module path (CrescentConnector)."""

    name: str
    module_path: str
    extra_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Load:
    """What vLLM last reported, plus counters summed over its per-step deltas."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    connector: dict[str, int] = field(default_factory=dict)
    """CrescentConnector's counters, summed over the per-interval deltas vLLM hands the stat loggers."""


def _stat_logger_factory(load: _Load):
    """A per-engine vLLM stat-logger factory that keeps ``load`` current (runs in the front end's event loop)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class CrescentStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                load.running = scheduler_stats.num_running_reqs
                load.waiting = scheduler_stats.num_waiting_reqs
                load.kv_usage = scheduler_stats.kv_cache_usage
                load.prefix_queries += scheduler_stats.prefix_cache_stats.queries
                load.prefix_hits += scheduler_stats.prefix_cache_stats.hits
                for name, delta in (scheduler_stats.kv_connector_stats or {}).items():
                    if isinstance(delta, int | float):
                        load.connector[name] = load.connector.get(name, 0) + int(delta)
            if iteration_stats is not None:
                load.preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)

        def log_engine_initialized(self) -> None:
            pass

    return lambda vllm_config, engine_index=0: CrescentStatLogger(vllm_config, engine_index)


def vllm_block_size(settings: VllmEngineSettings, on_cpu: bool) -> int:
    """vLLM's block size: a multiple of 32 on CPU (its attention kernel refuses others), crescent's elsewhere."""
    if settings.vllm_block_size:
        return settings.vllm_block_size
    size = settings.kv_block_size
    return -(-size // 32) * 32 if on_cpu else size


def cpu_thread_env(torch_threads: int, environ: Mapping[str, str]) -> dict[str, str]:
    """vLLM-on-CPU environment for a worker given ``torch_threads`` (its share of the machine's cores; 0 = vLLM's
    own choice). vLLM's default (``VLLM_CPU_OMP_THREADS_BIND=auto``) pins one OpenMP thread to every core of the
    NUMA node: two vLLM workers on one machine (prefill and decode) then pin their threads to the *same* cores,
    and a forward pass of one waits at OpenMP barriers behind the other's spinning threads; measured on 2 cores: a
    3-request prefill step took 2.6 s while the decode worker decoded one stream, 0.37 s while it was idle, so
    concurrent requests sat at their first chunk until the first one's stream ended. With a share: that many
    threads, unpinned (``nobind``), so the OS spreads the workers over the cores. An operator's own
    ``VLLM_CPU_OMP_THREADS_BIND`` wins (per-worker core lists, for example)."""
    if torch_threads <= 0 or "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(torch_threads)}


def engine_args(settings: VllmEngineSettings, model_path: str, served_name: str,
                connector: ConnectorSpec | None, on_cpu: bool = True, kv_events_endpoint: str = "") -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments from crescent's settings (a dict: testable without vLLM).
    ``kv_events_endpoint``: where vLLM publishes its prefix cache's stored/removed pages ("" = nowhere)."""
    dtype = str(settings.resolved_dtype()).removeprefix("torch.")
    args: dict[str, Any] = {
        "model": model_path, "tokenizer": model_path, "served_model_name": served_name, "dtype": dtype,
        "block_size": vllm_block_size(settings, on_cpu), "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "enable_prefix_caching": settings.enable_prefix_caching, "enforce_eager": settings.vllm_enforce_eager,
        "gpu_memory_utilization": settings.vllm_gpu_memory_utilization, "seed": 0,
        "disable_log_stats": True,  # vLLM's Prometheus logger would register the vllm: names the worker exports
    }
    if settings.max_model_len:
        args["max_model_len"] = settings.max_model_len
    if connector is not None:
        args["kv_transfer_config"] = {"kv_connector": connector.name,
                                      "kv_connector_module_path": connector.module_path, "kv_role": "kv_both",
                                      # a block evicted between lookup and load is recomputed, not a failed request
                                      "kv_load_failure_policy": "recompute",
                                      "kv_connector_extra_config": dict(connector.extra_config)}
    if kv_events_endpoint and settings.enable_prefix_caching:
        args["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq",
                                    "endpoint": kv_events_endpoint}
    return args


class VllmEngine:
    """crescent's engine interface over a started ``vllm.v1.engine.async_llm.AsyncLLM``."""

    def __init__(self, llm: Any, tokenizer: Any, model_id: str, vocab_size: int, max_model_len: int,
                 total_blocks: int, kv_handoff: KvHandoff, load: _Load):
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_token_ids: set[int] = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.model_id = model_id
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_handoff = kv_handoff
        self._total_blocks = total_blocks
        self._load = load
        self._prefilling: dict[str, int] = {}  # request -> prompt tokens not yet past its first output
        self._context: dict[str, int] = {}  # request -> context tokens, once it decodes
        self._stopped = False
        self.page_size = 0
        """vLLM's KV page (block) size in tokens."""
        self.kv_events_endpoint = ""
        """Where vLLM publishes its KV-cache events ("" = it does not)."""

    @classmethod
    async def start(cls, settings: VllmEngineSettings, connector: ConnectorSpec | None = None,
                    kv_events_endpoint: str = "") -> VllmEngine:
        """Build and start vLLM's engine for ``settings.model`` (its engine core process loads the weights);
        ``kv_events_endpoint``: an ``ipc://`` path where vLLM publishes its prefix cache's events."""
        from pathlib import Path

        from crescent.models.prepare import prepare_model
        from crescent.models.tokenizer import Tokenizer

        path = str(prepare_model(settings.model))
        served = settings.served_model_name or Path(path).name
        load = _Load()
        # vLLM reads its CPU KV-cache size from the environment only; this process owns one engine
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.vllm_kv_cache_gib:g}"
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            os.environ.update(cpu_thread_env(settings.torch_threads, os.environ))

        args = engine_args(settings, path, served, connector, current_platform.is_cpu(), kv_events_endpoint)
        llm = await asyncio.to_thread(_build_async_llm, args, _stat_logger_factory(load))
        cfg = llm.vllm_config
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, Path(path))
        engine = cls(llm, tokenizer, served, cfg.model_config.get_vocab_size(), cfg.model_config.max_model_len,
                     int(cfg.cache_config.num_gpu_blocks or 0), "connector" if connector else "none", load)
        engine.page_size = args["block_size"]
        engine.kv_events_endpoint = kv_events_endpoint if "kv_events_config" in args else ""
        log.info("vLLM engine ready: model %s (%s), max_model_len %d, %d KV blocks of %d tokens, kv hand-off %s",
                 served, args["dtype"], engine.max_model_len, engine._total_blocks, args["block_size"],
                 engine.kv_handoff)
        return engine

    # --- the interface ------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self._stopped and not self.llm.errored

    def observe_steps(self, observer: StepObserver | None) -> None:
        """vLLM's steps run in its engine core process: the worker's step histogram stays empty."""

    def latest_stats(self) -> EngineStats:
        load, idle = self._load, not self._prefilling and not self._context
        total = self._total_blocks
        # vLLM reports with each step's outputs; after the last one its figures would still count that request
        return EngineStats(
            waiting=0 if idle else load.waiting, running=0 if idle else load.running,
            free_blocks=round(total * (1.0 - load.kv_usage)), total_blocks=total,
            queued_prefill_tokens=sum(self._prefilling.values()), running_context_tokens=sum(self._context.values()),
            prefix_query_tokens=load.prefix_queries, prefix_hit_tokens=load.prefix_hits,
            preemptions=load.preemptions, kv_connector=dict(load.connector))

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        if not self._stopped:
            self._stopped = True
            self.llm.shutdown()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                       forced_output_ids: list[int] | None = None, store: StoreParams | None = None,
                       **unsupported: Any) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs. Forced outputs are appended to vLLM's prompt and returned first (with
        the text crescent's detokenizer gives them, as crescent's engine does)."""
        if unsupported:
            raise ValueError(f"the vLLM engine moves KV itself; it takes no {sorted(unsupported)}")
        forced = list(forced_output_ids or [])
        vparams = self._vllm_params(prompt_ids, params, forced, store)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params, self.eos_token_ids)
        reasons = [detok.add(t) for t in forced]
        if any(reasons):  # the forced outputs alone end it (a stop string, EOS): nothing for vLLM to compute
            reason = next(r for r in reasons if r)
            yield RequestOutput(request_id, forced, detok.pop_text(), None, True, reason, len(prompt_ids),
                                len(forced), 0, forced, detok.text)
            return
        state = _Stream(request_id, len(prompt_ids), params, forced, detok)
        self._prefilling[request_id] = len(prompt_ids) + len(forced)
        try:
            async for vout in self._vllm_stream(request_id, prompt_ids + forced, vparams):
                out = state.convert(vout)
                self._prefilling.pop(request_id, None)  # past its first output: now it decodes
                self._context[request_id] = len(prompt_ids) + out.completion_tokens
                if out.new_token_ids or out.new_text or out.finished:
                    yield out
        finally:
            self._prefilling.pop(request_id, None)
            self._context.pop(request_id, None)

    # --- helpers ------------------------------------------------------------------------------------------------
    def _vllm_params(self, prompt_ids: list[int], params: SamplingParams, forced: list[int],
                     store: StoreParams | None) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        params.validate(self.vocab_size)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in [*prompt_ids, *forced] if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) + len(forced) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids) + len(forced)} tokens leaves no room to generate: this "
                             f"engine's max_model_len is {self.max_model_len}")
        kwargs = sampling_kwargs(params, len(forced))
        # never past the context: vLLM would refuse the request instead of stopping at the limit
        kwargs["max_tokens"] = min(kwargs["max_tokens"], self.max_model_len - len(prompt_ids) - len(forced))
        extra = None
        if store is not None and store.address and self.kv_handoff == "connector":
            extra = {"kv_transfer_params": store.as_kv_transfer_params()}
        return VllmSamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA, extra_args=extra)

    async def _vllm_stream(self, request_id: str, token_ids: list[int], vparams: Any) -> AsyncIterator[Any]:
        """vLLM's outputs, its errors as crescent's: a bad request is a ValueError, anything else EngineError."""
        from vllm.exceptions import VLLMClientError

        stream = self.llm.generate({"prompt_token_ids": token_ids}, vparams, request_id)
        try:
            while True:
                try:
                    vout = await anext(stream)
                except StopAsyncIteration:
                    return
                except (ValueError, VLLMClientError) as exc:
                    raise ValueError(str(exc)) from exc
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as exc:
                    raise EngineError(f"request {request_id} failed in vLLM: {type(exc).__name__}: "
                                      f"{exc.__cause__ or exc}") from exc
                yield vout
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # aborts the request in vLLM when we leave early


@dataclass
class _Stream:
    """One request's conversion of vLLM's delta outputs into crescent's."""

    request_id: str
    prompt_len: int
    params: SamplingParams
    forced: list[int]
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    held_text: str = ""
    started: bool = False

    def convert(self, vout: Any) -> RequestOutput:
        comp = vout.outputs[0] if vout.outputs else None
        new_ids = list(comp.token_ids) if comp is not None else []
        new_text = comp.text if comp is not None else ""
        new_lp = None
        if self.params.logprobs is not None:
            new_lp = logprobs_from_vllm(new_ids, comp.logprobs if comp is not None else None, self.params.logprobs)
        if not self.started:  # the forced outputs lead, with crescent's detokenization of them
            self.started = True
            first_text = self.detok.pop_text()
            self.held_text = self.detok.text[self.detok.emitted:]  # a tail held back as a possible stop string
            new_ids = self.forced + new_ids
            new_text = first_text + self.held_text + new_text
            if new_lp is not None:
                new_lp = [(t, float("nan"), []) for t in self.forced] + new_lp
        self.token_ids += new_ids
        self.text += new_text
        finished = bool(vout.finished)
        out = RequestOutput(self.request_id, new_ids, new_text, new_lp, finished,
                            (comp.finish_reason if comp is not None else None) if finished else None,
                            self.prompt_len, len(self.token_ids), vout.num_cached_tokens or 0)
        if finished:
            out.finish_reason = out.finish_reason or "abort"
            out.token_ids, out.text = list(self.token_ids), self.text
            out.kv_transfer_params = dict(vout.kv_transfer_params or {})
        return out


def _build_async_llm(args: dict[str, Any], stat_logger: Any) -> Any:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    if "kv_transfer_config" in args:
        args = {**args, "kv_transfer_config": KVTransferConfig(**args["kv_transfer_config"])}
    if "kv_events_config" in args:
        from vllm.config import KVEventsConfig

        args = {**args, "kv_events_config": KVEventsConfig(**args["kv_events_config"])}
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[stat_logger])
