"""The engine interface: what a worker service (prefill, decode, or an aggregated worker) needs from an engine.

Two engines implement it: crescent's own (``AsyncEngine`` over ``LLMEngine``) and vLLM's (``VllmEngine``, its
``AsyncLLM`` in-process). The services add a request and stream its outputs, abort it, read the engine's load, and
use its tokenizer, EOS ids and limits; nothing else of an engine's insides.

KV hand-off to and from the kvstore differs by engine, and ``kv_handoff`` says how:

- ``"blocks"`` (crescent's): the *service* moves KV blocks. It asks which prompt blocks the engine already caches,
  fetches the rest from the store and hands them to ``generate(import_kv=...)``; a prefill runs with
  ``hold_kv=True`` and takes the finished request's blocks (``take_held_blocks``) to write them to the store.
  Such an engine is a :class:`BlockKvEngine`.
- ``"connector"`` (vLLM with ``CrescentConnector``): the *engine* moves them, inside its forward pass. The service
  passes per-request :class:`StoreParams` (which store, load the prompt's stored prefix, save its new blocks) and
  reads what the connector did from the finished output's ``kv_transfer_params``.
- ``"none"``: KV stays inside the engine (vLLM without a connector): a disaggregated decode recomputes the prompt,
  an aggregated worker reuses it from the engine's own prefix cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from crescent.engine.outputs import EngineStats, RequestOutput
from crescent.engine.sampling_params import SamplingParams

KvHandoff = Literal["blocks", "connector", "none"]

StepObserver = Callable[[str, float, int, int], None]
"""Called after each forward: (batch kind, seconds, prompt tokens computed, tokens sampled)."""


@dataclass(frozen=True)
class StoreParams:
    """One request's KV hand-off through the kvstore, for an engine whose connector moves the KV itself.

    ``as_kv_transfer_params()`` is the per-request dict ``CrescentConnector`` reads (the #16 contract)."""

    address: str
    """The store's bulk-data address, host:port ("" = no store)."""
    transport: str = "tcp"
    """The store's data transport: "tcp" or "mooncake"."""
    model_id: str = ""
    """The block-hash namespace (the engine's model id)."""
    load: bool = False
    """Look the prompt's full blocks up in the store and load the longest stored prefix instead of computing it."""
    save: bool = False
    """Write the prompt's full blocks to the store once computed."""

    def as_kv_transfer_params(self) -> dict[str, Any]:
        return {"kvstore_address": self.address, "kvstore_transport": self.transport or "tcp",
                "model_id": self.model_id, "load": self.load, "save": self.save}


@runtime_checkable
class Engine(Protocol):
    """What every worker service calls. Attributes are fixed once the engine is started."""

    model_id: str
    """The served model's block-hash namespace (``name@version`` for a published model)."""
    tokenizer: Any
    """crescent's tokenizer of the model (decode detokenizes the first token with it)."""
    eos_token_ids: set[int]
    vocab_size: int
    max_model_len: int
    """Longest prompt + output this engine accepts."""
    kv_handoff: KvHandoff

    @property
    def running(self) -> bool: ...

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                 forced_output_ids: list[int] | None = None, store: StoreParams | None = None,
                 **engine_kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (deltas; the finished one carries ``token_ids``/``text`` whole).

        ``forced_output_ids``: outputs generated elsewhere (prefill's first token): returned first, then sampled
        past. ``store``: the connector's hand-off (engines with ``kv_handoff == "connector"``; others ignore it).
        Leaving the iterator early aborts the request. A failure inside the engine raises ``EngineError``; a bad
        request raises ``ValueError`` before any output."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request (unknown ids are ignored)."""
        ...

    def latest_stats(self) -> EngineStats:
        """Load as of the engine's last step, without waiting for the step in progress (heartbeats read it)."""
        ...

    def observe_steps(self, observer: StepObserver | None) -> None:
        """Record each forward's kind and duration (the worker's step metrics); an engine that cannot see its
        steps ignores it."""
        ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


@runtime_checkable
class BlockKvEngine(Engine, Protocol):
    """An engine whose KV blocks the service moves (``kv_handoff == "blocks"``): ``generate`` also takes
    ``hold_kv=True`` (keep a finished request's blocks for ``take_held_blocks``) and ``import_kv=(hashes, blocks)``
    (insert blocks into the prefix cache in the same engine turn as the request's admission)."""

    kv_block_shape: tuple[int, ...]
    """One block as the store holds it: [num_layers, 2, block_size, n_kv_heads, head_dim]."""
    kv_dtype: Any
    """The torch dtype of a block."""

    async def cached_prefix_blocks(self, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` the engine's prefix cache holds."""
        ...

    async def take_held_blocks(self, request_id: str) -> tuple[list[int], list[Any]]:
        """The hashes and KV of a held (``hold_kv=True``) finished request's full blocks; releases it."""
        ...
