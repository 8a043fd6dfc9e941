"""What the engine reports: per-request deltas after each step, and engine-wide load for the conductor."""

from __future__ import annotations

from dataclasses import dataclass, field

from crescent.engine.sampler import Logprob


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[Logprob] | None = None
    """Per new token (token id, logprob, top-N [(id, logprob)]) when logprobs were asked for. Forced outputs
    (generated elsewhere) carry logprob NaN and no top-N: the worker that sampled them reported those."""
    finished: bool = False
    finish_reason: str | None = None
    """"stop", "length", "abort" (cancelled, or failed: see ``error``) or None while running."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (local or imported)."""
    token_ids: list[int] = field(default_factory=list)
    """All output token ids: on the finished output only (copying them into every step's output would cost
    O(output length) per token)."""
    text: str = ""
    """All output text: on the finished output only, like ``token_ids``."""
    error: str | None = None
    """Why the request failed, when a step raised."""
    kv_transfer_params: dict | None = None
    """On the finished output of an engine whose connector moved the KV (vLLM's ``CrescentConnector``): what it did,
    e.g. ``{"loaded_tokens": n, "stored_blocks": k, "block_hashes": [...]}``."""

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by ``later`` (of the same request) as one delta: a consumer that fell behind
        takes every queued step's tokens at once."""
        lp = None
        if self.new_logprobs is not None or later.new_logprobs is not None:
            lp = (self.new_logprobs or []) + (later.new_logprobs or [])
        return RequestOutput(
            self.request_id, self.new_token_ids + later.new_token_ids, self.new_text + later.new_text, lp,
            later.finished, later.finish_reason, later.prompt_tokens, later.completion_tokens, later.cached_tokens,
            later.token_ids, later.text, later.error, later.kv_transfer_params)


@dataclass
class EngineStats:
    waiting: int
    running: int
    free_blocks: int
    total_blocks: int
    queued_prefill_tokens: int
    """Tokens still to prefill: waiting prompts plus the unprefilled part of running ones."""
    running_context_tokens: int
    """Tokens of context across running sequences (what decode attention reads per step)."""
    prefix_query_tokens: int
    prefix_hit_tokens: int
    preemptions: int
    kv_connector: dict[str, int] = field(default_factory=dict)
    """Totals of the engine's KV connector (vLLM's CrescentConnector: loads, loaded_tokens, saves, stored_blocks,
    lookup_misses, ...); empty for an engine without one."""

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0
