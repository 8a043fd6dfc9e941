"""LLMEngine: schedule -> forward -> sample -> detokenize, one step at a time (single-threaded; see async_engine).

The same engine serves both roles of a disaggregated deployment: a prefill worker runs a request with
``hold_kv=True`` and exports its blocks; a decode worker imports them into its prefix cache and continues the
request with ``forced_output_ids`` (prefill's first token), sampling from output index len(forced) on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crescent.engine.block_manager import BlockManager
from crescent.engine.detokenizer import IncrementalDetokenizer
from crescent.engine.interface import StepObserver
from crescent.engine.model_runner import ModelRunner, kv_block_bytes
from crescent.engine.outputs import EngineStats, RequestOutput
from crescent.engine.sampler import Logprob, SampleRequest, sample
from crescent.engine.sampling_params import SamplingParams
from crescent.engine.scheduler import Scheduler, SchedulerConfig
from crescent.engine.sequence import Sequence, SequenceStatus
from crescent.engine.settings import EngineSettings
from crescent.engine.structured import GrammarCompiler

log = logging.getLogger(__name__)



@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    unreported: list[int] = field(default_factory=list)
    """Forced outputs not yet returned in a RequestOutput."""
    finish_reason: str | None = None
    grammar: Any = None
    """The structured-output GrammarMatcher, advanced on every output token; None for free text."""


class LLMEngine:
    def __init__(self, model, tokenizer, settings: EngineSettings | None = None):
        self.settings = settings = settings or EngineSettings()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.model_id = settings.served_model_name or Path(settings.model).name
        bs = settings.kv_block_size
        dtype = next(model.parameters()).dtype
        num_blocks = settings.num_kv_blocks or settings.kv_cache_memory_bytes // kv_block_bytes(self.config, bs, dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={settings.kv_cache_memory_bytes} holds no KV block of "
                             f"{kv_block_bytes(self.config, bs, dtype)} bytes: raise it or set num_kv_blocks")
        self.max_model_len = min(settings.max_model_len or self.config.max_position_embeddings, num_blocks * bs)
        self.block_manager = BlockManager(num_blocks, bs, self.model_id, settings.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(settings.max_num_seqs, settings.max_num_batched_tokens),
                                   self.block_manager)
        _select_attention_backend(model, settings.attention_backend)
        self.runner = ModelRunner(model, num_blocks, bs)
        # the tokenizer's end-of-turn ids and the model config's EOS both end a request
        self.eos_token_ids = set(getattr(tokenizer, "eos_token_ids", None) or ()) | set(self.config.eos_token_ids)
        self.grammars = GrammarCompiler(tokenizer, self.config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.held: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # outputs decided outside step() (finished on arrival)
        self.step_observer: StepObserver | None = None
        """Set by a serving process to record each step (its metrics); the engine itself knows no metrics."""
        self.stalled = False
        """The last step had requests but could schedule none (held blocks pin the cache until release())."""

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> LLMEngine:
        from crescent.models.loader import load_model
        from crescent.models.prepare import prepare_model

        path = prepare_model(settings.model)
        model, tokenizer, _ = load_model(path, settings.resolved_device(), settings.resolved_dtype())
        if not settings.served_model_name:
            settings = settings.model_copy(update={"served_model_name": Path(path).name})
        return cls(model, tokenizer, settings)

    # --- requests ---------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    forced_output_ids: list[int] | None = None, hold_kv: bool = False,
                    import_kv: tuple[list[int], list[torch.Tensor]] | None = None) -> None:
        """Queue a request. ``forced_output_ids``: outputs generated elsewhere (prefill's first token), returned
        first and sampled past. ``hold_kv``: keep its blocks after it finishes, for export, until release().
        ``import_kv``: (hashes, blocks) to import_blocks() first, in the same engine turn, so no step can evict
        them between the import and the request's admission."""
        if request_id in self.requests or request_id in self.held:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate(self.config.vocab_size)
        forced = list(forced_output_ids or [])
        ids = list(prompt_token_ids) + forced
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room to generate: this engine's max_model_len "
                             f"is {self.max_model_len}")
        if params.prior_outputs >= len(prompt_token_ids):
            raise ValueError(f"prior_outputs={params.prior_outputs} leaves no prompt of the "
                             f"{len(prompt_token_ids)} tokens")
        grammar = self._grammar_for(params, list(prompt_token_ids[len(prompt_token_ids) - params.prior_outputs:])
                                    + forced)
        if import_kv is not None:
            self.import_blocks(*import_kv)
        seq = Sequence(request_id, list(prompt_token_ids), params, forced, hold_kv)
        detok = IncrementalDetokenizer(self.tokenizer or _NoText(), seq.token_ids[:seq.prompt_len], params,
                                       self.eos_token_ids)
        req = _Request(seq, detok, unreported=forced, grammar=grammar)
        self.requests[request_id] = req
        for t in forced:
            reason = req.detok.add(t)
            if reason is None and grammar is not None and grammar.is_terminated():
                reason = "stop"
                req.detok.finish(reason)
            if reason is not None:  # the forced tokens alone end it: nothing to compute
                seq.status = SequenceStatus.FINISHED
                self._pending.append(self._finish(req, reason, [], None))
                return
        self.scheduler.add(seq)

    def _grammar_for(self, params: SamplingParams, forced: list[int]) -> Any:
        """A matcher for the request's response_format, advanced past outputs generated elsewhere under the same
        grammar (a resumed stream's prior outputs, prefill's first token); None for free text."""
        if not params.response_format:
            return None
        grammar = self.grammars.matcher(params.response_format)
        for t in forced:
            if not grammar.accept_token(t):
                raise ValueError(f"earlier output token {t} is not allowed by the request's response_format")
        return grammar

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks (held ones too). Unknown ids are ignored."""
        if request_id in self.held:
            self.release(request_id)
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.seq.hold_kv = False
        return self._finish(req, "abort", [], None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # --- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        self.stalled = batch.is_empty and not outputs and bool(self.requests)
        if batch.is_empty:
            return outputs
        samplers = [item for item in batch.seqs if item.samples]
        started = time.perf_counter()
        try:
            logits = self.runner.run(batch)
            tokens, logprobs = ([], [])
            if samplers:
                reqs = [_sample_request(self.requests[i.seq.request_id]) for i in samplers]
                tokens, logprobs = sample(logits, reqs)
        except Exception as exc:  # a failed forward fails its batch, never the engine
            log.exception("engine step failed; aborting %d requests", len(batch.seqs))
            for item in batch.seqs:
                out = self.abort_request(item.seq.request_id)
                if out is not None:
                    out.error = f"{type(exc).__name__}: {exc}"
                    outputs.append(out)
            return outputs
        if self.step_observer is not None:
            self._observe_step(batch, len(samplers), time.perf_counter() - started)
        it = iter(zip(tokens, logprobs, strict=True))
        sampled = [next(it) if item.samples else None for item in batch.seqs]
        self.scheduler.postprocess(batch, [s[0] if s else None for s in sampled])
        for item, s in zip(batch.seqs, sampled, strict=True):
            if s is not None:
                outputs.append(self._on_token(self.requests[item.seq.request_id], s[0], s[1]))
        return outputs

    def _observe_step(self, batch, num_sampled: int, seconds: float) -> None:
        prompt = sum(max(0, min(i.start + i.num_new, i.seq.prompt_len) - i.start) for i in batch.seqs)
        self.step_observer(batch.kind, seconds, prompt, num_sampled)

    def _on_token(self, req: _Request, token: int, logprob: Logprob | None) -> RequestOutput:
        reason = req.detok.add(token)
        if req.grammar is not None and reason is None:
            accepted = req.grammar.accept_token(token)
            if not accepted:  # the mask allowed it, so this is a bug; end the request rather than the engine
                log.error("request %s: token %d rejected by its grammar; ending it", req.seq.request_id, token)
            if not accepted or req.grammar.is_terminated():
                reason = "stop"
                req.detok.finish(reason)
        if reason is None and req.seq.num_tokens >= self.max_model_len:
            reason = "length"
            req.detok.finish(reason)
        if reason is not None:
            return self._finish(req, reason, [token], logprob)
        return self._output(req, [token], logprob)

    def _output(self, req: _Request, new_ids: list[int], logprob: Logprob | None) -> RequestOutput:
        seq = req.seq
        new_ids = req.unreported + new_ids
        new_lp = None
        if seq.params.logprobs is not None:
            new_lp = [(t, math.nan, []) for t in req.unreported] + ([logprob] if logprob else [])
        req.unreported = []
        out = RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_text=req.detok.pop_text(), new_logprobs=new_lp,
            finished=req.finish_reason is not None, finish_reason=req.finish_reason, prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_outputs, cached_tokens=seq.num_cached_tokens)
        if out.finished:  # the whole output only once: per step it would copy O(length) per token
            out.token_ids, out.text = seq.output_ids, req.detok.text[:req.detok.emitted]
        return out

    def _finish(self, req: _Request, reason: str, new_ids: list[int], logprob: Logprob | None) -> RequestOutput:
        req.finish_reason = reason
        req.detok.finish(reason)
        seq = req.seq
        self.requests.pop(seq.request_id, None)
        if seq.status != SequenceStatus.FINISHED or not seq.hold_kv:
            self.scheduler.finish(seq)
        if seq.hold_kv and reason != "abort":
            self.held[seq.request_id] = seq
        return self._output(req, new_ids, logprob)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run ``prompts`` to completion; the final output of each, in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
            if self.stalled:
                raise RuntimeError("no request can be scheduled: held requests pin the KV cache (release() them)")
        return [final[rid] for rid in ids]

    # --- disaggregation ---------------------------------------------------------------------------------------
    def export_request_blocks(self, request_id: str) -> tuple[list[int], list[torch.Tensor]]:
        """Hashes and KV of the full blocks of a finished request held with hold_kv=True."""
        seq = self.held.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not held (add it with hold_kv=True and let it finish)")
        full = min(seq.num_computed // self.block_manager.block_size, len(seq.block_table))
        hashes = self.block_manager.hashes(seq, full)
        return list(hashes), [self.runner.read_block(b) for b in seq.block_table[:full]]

    def export_blocks(self, hashes: list[int]) -> list[torch.Tensor | None]:
        return [None if b is None else self.runner.read_block(b) for b in self.block_manager.blocks_of(hashes)]

    def import_blocks(self, hashes: list[int], blocks: list[torch.Tensor]) -> int:
        """Insert blocks into the prefix cache (as free cached blocks); returns how many were newly inserted."""
        if len(hashes) != len(blocks):
            raise ValueError(f"{len(hashes)} hashes for {len(blocks)} blocks")
        for data in blocks:
            self.runner.check_block(data)  # validate all before touching the cache
        reserved = self.block_manager.reserve_imports(hashes)
        by_hash = dict(zip(hashes, blocks, strict=True))
        for h, block in reserved:
            self.runner.write_block(block, by_hash[h])
        # A backend that caches per-page state (the Triton MoBA centroid pool) must forget these pages.
        invalidate = getattr(getattr(self.runner.model, "attention_backend", None), "invalidate_pages", None)
        if invalidate is not None:
            invalidate([block for _, block in reserved])
        return len(reserved)

    def release(self, request_id: str) -> None:
        """Free a held request's blocks (its full blocks stay in the prefix cache)."""
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)

    def cached_prefix_blocks(self, hashes: list[int]) -> int:
        return self.block_manager.cached_prefix_blocks(hashes)

    def stats(self) -> EngineStats:
        sch = self.scheduler
        return EngineStats(
            waiting=len(sch.waiting), running=len(sch.running), free_blocks=self.block_manager.num_free,
            total_blocks=self.block_manager.num_blocks,
            queued_prefill_tokens=sum(s.num_uncomputed for s in sch.waiting)
            + sum(max(0, s.num_uncomputed - 1) for s in sch.running),
            running_context_tokens=sum(s.num_tokens for s in sch.running),
            prefix_query_tokens=sch.prefix_query_tokens, prefix_hit_tokens=sch.prefix_hit_tokens,
            preemptions=sch.num_preemptions)


def _sample_request(req: _Request) -> SampleRequest:
    seq, prior = req.seq, req.seq.params.prior_outputs
    index = seq.num_outputs + prior  # a resumed stream's outputs continue the original's
    if not seq.params.has_penalties:  # skip copying the token history every step
        return SampleRequest(seq.params, index, grammar=req.grammar)
    split = seq.prompt_len - prior
    return SampleRequest(seq.params, index, seq.token_ids[:split], seq.token_ids[split:], req.grammar)


def _select_attention_backend(model, name: str) -> None:
    """Swap the model's attention backend per settings; models without backends (test doubles) are left alone."""
    if not hasattr(model, "set_attention_backend"):
        return
    from crescent.models import attention

    try:
        from crescent.models.attention_triton import TritonAttentionBackend as triton_cls
    except ImportError:  # a build without the GPU extra
        triton_cls = None
    on_cuda = next(model.parameters()).device.type == "cuda"
    if name == "triton" or (name == "auto" and on_cuda and triton_cls is not None):
        if triton_cls is None:
            raise ValueError("attention_backend='triton' is not available in this build: use 'torch' or 'auto'")
        model.set_attention_backend(triton_cls())
    elif name == "torch":
        model.set_attention_backend(attention.TorchAttentionBackend())
    elif not on_cuda and name in ("auto", "cpu"):
        from crescent.kernels import cpu  # builds the kernels here, at start-up, not in the first request

        if name == "cpu" and not cpu.available():
            raise ValueError(f"attention_backend='cpu' needs the CPU kernels: {cpu.unavailable_reason()}")
        model.set_attention_backend(attention.TorchAttentionBackend(cpu_kernels=cpu.available()))


class _NoText:
    """Stands in for a tokenizer when the engine runs on token ids only (tests, benchmarks)."""

    def decode(self, ids: list[int]) -> str:
        return ""
