"""Structured outputs: a request's response_format compiled (xgrammar) into a grammar that masks every sampled token.

One :class:`GrammarCompiler` per engine holds the tokenizer's vocabulary as xgrammar sees it and an LRU of compiled
grammars (many requests share a schema, and compiling is the costly part). Each request gets its own matcher: the
sampler masks its logits with the matcher's token bitmask, the engine advances the matcher on every output token
(forced ones included) and ends the request when the grammar has terminated.

JSON is generated compact (no free whitespace) and in strict mode (no properties the schema does not name): both
only narrow the output to a subset of what the schema accepts, and they keep a weak model from wandering in
whitespace or inventing keys until max_tokens. xgrammar is imported on first use: workers that never see a
response_format never load it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

GRAMMAR_CACHE_SIZE = 64
"""Compiled grammars kept per engine (an LRU keyed by the response_format text)."""


def _schema_of(response_format: str) -> str:
    try:
        spec = json.loads(response_format)
    except json.JSONDecodeError as exc:
        raise ValueError(f"response_format is not JSON: {exc}") from exc
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema" and isinstance(spec.get("schema"), dict):
        return json.dumps(spec["schema"])
    raise ValueError('response_format must be {"type": "json_object"} or {"type": "json_schema", "schema": {...}}')


class GrammarCompiler:
    """Compiles response formats against one tokenizer; thread-safe (the engine thread and warm-up may share it)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]):
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()  # held only around the LRU: the engine thread never waits on a compile
        self._init_lock = threading.Lock()

    def _xgr_compiler(self) -> Any:
        with self._init_lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import PreTrainedTokenizerFast

                backend = getattr(self._tokenizer, "backend", None)
                if backend is None:
                    raise ValueError("response_format needs the model's Hugging Face tokenizer (tokenizer.json)")
                info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=backend),
                                                          vocab_size=self._vocab_size, stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, response_format: str) -> Any:
        """The CompiledGrammar of a response_format (cached); ValueError when the schema cannot be compiled.
        AsyncEngine calls it off the engine thread first, so add_request usually finds it cached."""
        schema = _schema_of(response_format)
        with self._cache_lock:
            compiled = self._cache.get(schema)
            if compiled is not None:
                self._cache.move_to_end(schema)
                return compiled
        try:
            compiled = self._xgr_compiler().compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as exc:  # how xgrammar reports a schema it cannot take
            raise ValueError(f"response_format schema cannot be compiled: {exc}") from exc
        with self._cache_lock:
            self._cache[schema] = compiled
            if len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, response_format: str) -> Any:
        """A fresh GrammarMatcher for one request."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(response_format))


def apply_grammars(logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
    """Mask (to -inf) the tokens each row's grammar forbids next; rows whose matcher is None are untouched.
    ``logits`` [N, vocab] fp32; returns a new tensor when any row is masked."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    logits = logits.clone()
    if logits.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    else:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
    return logits
