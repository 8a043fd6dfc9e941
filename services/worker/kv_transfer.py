"""Moving a worker's KV blocks to and from the kvstore (blocking transport calls, run off the event loop).

A block on the wire is the engine's block tensor ``[num_layers, 2, block_size, n_kv_heads, head_dim]`` as raw
bytes, stored whole (all layers in one entry, the store's WHOLE_BLOCK layer range). One client per
(address, transport), one call at a time on it: the transports keep one framed connection each.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings

import torch

log = logging.getLogger(__name__)


class KvTransfer:
    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float = 30.0,
                 internal_token: str = ""):
        self.block_shape = block_shape
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.internal_token = internal_token  # the store's data port checks it once per connection
        self.num_layers = block_shape[0]
        self._clients: dict[tuple[str, str], tuple[object, threading.Lock]] = {}
        self._guard = threading.Lock()

    def _client(self, address: str, transport: str):
        from crescent.services.kvstore.client import KvStoreClient

        key = (address, transport or "tcp")
        with self._guard:
            entry = self._clients.get(key)
            if entry is None:
                entry = (KvStoreClient.connect(address, transport=key[1], token=self.internal_token),
                         threading.Lock())
                self._clients[key] = entry
        return entry

    def _call(self, address: str, transport: str, fn):
        client, lock = self._client(address, transport)
        with lock:
            return fn(client)

    async def lookup(self, address: str, transport: str, model_id: str, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` the store holds."""
        if not hashes:
            return 0
        return await asyncio.to_thread(self._call, address, transport,
                                       lambda c: c.lookup_prefix(model_id, hashes))

    async def get(self, address: str, transport: str, model_id: str, hashes: list[int]) -> list[torch.Tensor]:
        """The leading stored blocks of ``hashes`` as engine block tensors (stops at the first miss)."""
        if not hashes:
            return []
        views = await asyncio.to_thread(self._call, address, transport,
                                        lambda c: c.get_prefix(model_id, hashes))
        return [self._tensor(v) for v in views]

    async def put(self, address: str, transport: str, model_id: str, hashes: list[int],
                  blocks: list[torch.Tensor]) -> int:
        """Write blocks; returns how many the store now holds of them."""
        if not hashes:
            return 0
        return await asyncio.to_thread(self._call, address, transport,
                                       lambda c: c.put_blocks(model_id, hashes, blocks))

    def _tensor(self, view) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only buffer: import_blocks copies it into the cache anyway
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(view, dtype=self.dtype)
        return flat.view(self.block_shape)

    def close(self) -> None:
        with self._guard:
            for client, _ in self._clients.values():
                close = getattr(client, "close", None)
                if close:
                    close()
            self._clients.clear()
