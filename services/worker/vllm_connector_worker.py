"""CrescentConnector's worker half: store blocks into vLLM's paged KV tensors and back, over crescent's transports.

Runs in vLLM's worker process (one per device; on CPU a ``VLLM::Worker`` process beside the engine core). Loads
run in ``start_load_kv``, which vLLM calls before the forward pass of a step with synchronous loads, so every layer
is in place before attention reads it (``wait_for_layer_load`` has nothing to wait for). Saves run in ``wait_for_save``, after the step's forward, reading
the finished pages of every layer at once from the caches vLLM registered (``register_kv_caches``); saving layer by
layer from ``save_kv_layer`` would overlap the transfer with compute, which a one-entry-per-block store format
(all layers in one block, as crescent's engine writes it) cannot use yet.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from crescent.services.worker.vllm_connector_io import KvEventReporter, StoreClients
from crescent.services.worker.vllm_connector_plan import (
    ConnectorConfig,
    ConnectorCounters,
    LoadSpec,
    SaveSpec,
)
from crescent.services.worker.vllm_kv_layout import (
    PageLayout,
    check_paged_layer,
    from_store_blocks,
    gather_tokens,
    layer_order,
    scatter_tokens,
    to_store_blocks,
)

log = logging.getLogger(__name__)


class ConnectorWorker:
    def __init__(self, config: ConnectorConfig, report_events: bool):
        self.config = config
        self.store = StoreClients(config.internal_token, config.timeout_s)
        self.counters = ConnectorCounters()
        self.events = (KvEventReporter(config.conductor_address, config.instance_id, config.internal_token,
                                       config.timeout_s)
                       if report_events and config.conductor_address else None)
        self.layers: list[torch.Tensor] = []
        self.layout: PageLayout | None = None
        self.results: dict[str, dict[str, Any]] = {}  # per request, since the last step's hand-back
        self.failed_block_ids: set[int] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], layout: PageLayout) -> None:
        """vLLM's layer caches (model order) and the kernel's page layout (``probe_page_layout``)."""
        self.layers = [kv_caches[name] for name in layer_order(list(kv_caches))]
        page_size, heads, head_dim = layout.key_pos.shape
        shapes = {check_paged_layer(layer) for layer in self.layers}
        if shapes != {(heads, page_size, head_dim)}:
            raise ValueError(f"KV caches of shapes {sorted(shapes)} do not match the probed page layout")
        self.layout = layout

    @property
    def block_shape(self) -> tuple[int, ...]:
        """A store block: ``[num_layers, 2, block_size, num_kv_heads, head_dim]``."""
        assert self.layout is not None
        _, heads, dim = self.layout.key_pos.shape
        return (len(self.layers), 2, self.config.block_size, heads, dim)

    # -- loads ----------------------------------------------------------------------------------------------------

    def load(self, orders: list[LoadSpec]) -> None:
        for order in orders:
            try:
                loaded = self._load_one(order)
                error = "" if loaded == len(order.slots) else (
                    f"kvstore at {order.address} held {loaded} of {len(order.slots)} tokens at load time")
            except Exception as err:  # a failed load must not kill the step: vLLM recomputes the failed blocks
                self.store.drop(order.address, order.transport)
                loaded, error = 0, f"kvstore load from {order.address} failed: {err}"
            if error:
                log.warning("request %s: %s", order.req_id, error)
                self.counters.add("load_errors")
                self.failed_block_ids.update(s // order.page_size for s in order.slots[loaded:])
            self.counters.add("loads", int(loaded > 0))
            self.counters.add("loaded_tokens", loaded)
            self.results.setdefault(order.req_id, {}).update(loaded_tokens=loaded, error=error)
            if loaded and self.events is not None:
                self.events.stored(order.model_id, order.hashes[:(order.skip + loaded) // self.config.block_size])

    def _load_one(self, order: LoadSpec) -> int:
        """Tokens written into vLLM's cache (fewer than ordered when the store lost blocks since the lookup)."""
        client = self.store.get(order.address, order.transport)
        views = client.get_prefix(order.model_id, order.hashes)
        if not views:
            return 0
        blocks = torch.stack([self._block_tensor(v) for v in views])
        kv = from_store_blocks(blocks)[:, order.skip:order.skip + len(order.slots)]
        n = kv.shape[1]
        assert self.layout is not None
        scatter_tokens(self.layers, self.layout, torch.tensor(order.slots[:n], dtype=torch.long), kv)
        return n

    def _block_tensor(self, view: memoryview) -> torch.Tensor:
        dtype = self.layers[0].dtype
        shape = self.block_shape
        expected = torch.Size(shape).numel() * dtype.itemsize
        if view.nbytes != expected:
            raise ValueError(f"a stored block has {view.nbytes} bytes, this model's is {expected} "
                             f"({shape} {dtype}): another model or dtype under the same model_id?")
        with warnings.catch_warnings():  # a read-only buffer: scatter copies it into the cache
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=dtype).view(shape)

    # -- saves ----------------------------------------------------------------------------------------------------

    def save(self, orders: list[SaveSpec]) -> None:
        for order in orders:
            try:
                assert self.layout is not None
                kv = gather_tokens(self.layers, self.layout, torch.tensor(order.slots, dtype=torch.long))
                blocks = to_store_blocks(kv, self.config.block_size)
                client = self.store.get(order.address, order.transport)
                stored = client.put_blocks(order.model_id, order.hashes, list(blocks))
                error = "" if stored == len(order.hashes) else (
                    f"kvstore at {order.address} kept {stored} of {len(order.hashes)} blocks (full?)")
            except Exception as err:  # a failed save costs future cache hits, never this request
                self.store.drop(order.address, order.transport)
                stored, error = 0, f"kvstore save to {order.address} failed: {err}"
            if error:
                log.warning("request %s: %s", order.req_id, error)
                self.counters.add("save_errors")
            self.counters.add("saves")
            self.counters.add("stored_blocks", stored)
            result = self.results.setdefault(order.req_id, {})
            result["stored_blocks"] = result.get("stored_blocks", 0) + stored
            result["ordered_blocks"] = result.get("ordered_blocks", 0) + len(order.hashes)
            if error:
                result["error"] = error
            if stored and self.events is not None:
                self.events.stored(order.model_id, order.hashes[:stored])

    # -- hand-back ------------------------------------------------------------------------------------------------

    def take_results(self) -> dict[str, dict[str, Any]]:
        results, self.results = self.results, {}
        return results

    def take_failed_block_ids(self) -> set[int]:
        failed, self.failed_block_ids = self.failed_block_ids, set()
        return failed

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        self.store.close()
