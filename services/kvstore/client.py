"""The kvstore client library prefill and decode workers use.

    client = KvStoreClient.connect("127.0.0.1:50082", transport="tcp")
    client.put_blocks(model_id, hashes, blocks, layer_range=(0, n_layers))
    views = client.get_prefix(model_id, hashes, layer_range=(0, n_layers))

``address`` is the store's data address (StatsResponse.data_address / InstanceInfo.data_address). A block is
the raw bytes of a contiguous tensor (a ``torch.Tensor``, ``bytes`` or any buffer); the store keys it by
(model id, prefix block hash, layer range), so a worker that writes layer by layer puts each range separately
and reads the same ranges back. Thread-safe: calls on one client are serialized by a lock, so threads that
want parallel transfers each open their own client.
"""

from __future__ import annotations

import sys
import threading

from crescent.services.kvstore.transport import FetchedBlock, TransportClient
from crescent.services.kvstore.wire import ANY_LAYERS, WHOLE_BLOCK, BlockStatus

TRANSPORTS = ("tcp", "mooncake")


def as_bytes_view(block) -> memoryview:
    """A flat byte view of a tensor/array/buffer without copying (a CPU contiguous tensor is used in
    place)."""
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; never pay its import for bytes
    if torch is not None and isinstance(block, torch.Tensor):
        tensor = block.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    view = memoryview(block)
    if not view.c_contiguous:
        raise ValueError("a KV block must be a contiguous buffer")
    return view.cast("B")


class KvStoreClient:
    def __init__(self, transport: TransportClient):
        self.transport = transport
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, address: str, transport: str = "tcp", timeout_s: float = 30.0,
                verify_checksums: bool = False, token: str = "") -> KvStoreClient:
        """Connect to a kvstore's data address ("host:port") over ``transport`` ("tcp" or "mooncake"); ``token``
        is the cluster's internal token, which a store that has one requires (ServerError without it)."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"kvstore address must be host:port, got {address!r}")
        if transport == "tcp":
            from crescent.services.kvstore.tcp import TcpTransport

            backend: TransportClient = TcpTransport(host, int(port), timeout_s, verify_checksums, token)
            backend.conn.get()  # fail fast on a wrong address
        elif transport == "mooncake":
            from crescent.services.kvstore.mooncake import MooncakeTransport

            backend = MooncakeTransport(host, int(port), timeout_s, verify_checksums=verify_checksums, token=token)
        else:
            raise ValueError(f"unknown kvstore transport {transport!r}; use one of {TRANSPORTS}")
        return cls(backend)

    def put_blocks(
        self,
        model_id: str,
        hashes: list[int],
        blocks: list,
        layer_range: tuple[int, int] = WHOLE_BLOCK,
        metas: list[bytes] | None = None,
    ) -> int:
        """Store the blocks (with optional per-block metadata); returns how many the store now holds."""
        if len(blocks) != len(hashes) or (metas is not None and len(metas) != len(hashes)):
            raise ValueError(f"{len(hashes)} hashes but {len(blocks)} blocks / {len(metas or [])} metas")
        if not hashes:
            return 0
        views = [as_bytes_view(b) for b in blocks]
        with self._lock:
            statuses = self.transport.put(
                model_id,
                tuple(layer_range),
                list(hashes),
                views,
                list(metas) if metas is not None else [b""] * len(hashes),
            )
        return sum(s in (BlockStatus.HIT, BlockStatus.EXISTS) for s in statuses)

    def get_blocks_with_meta(
        self,
        model_id: str,
        hashes: list[int],
        layer_range: tuple[int, int] = WHOLE_BLOCK,
        out: memoryview | None = None,
    ) -> list[FetchedBlock | None]:
        """Each block's bytes and metadata (None = miss). With ``out`` the bytes land in it (reused
        memory)."""
        if not hashes:
            return []
        with self._lock:
            return self.transport.get(model_id, tuple(layer_range), list(hashes), out)

    def get_blocks(
        self,
        model_id: str,
        hashes: list[int],
        layer_range: tuple[int, int] = WHOLE_BLOCK,
        out: memoryview | None = None,
    ) -> list[memoryview | None]:
        """Each block's bytes (None = miss)."""
        return [b.data if b else None for b in self.get_blocks_with_meta(model_id, hashes, layer_range, out)]

    def get_prefix(
        self,
        model_id: str,
        hashes: list[int],
        layer_range: tuple[int, int] = WHOLE_BLOCK,
        out: memoryview | None = None,
    ) -> list[memoryview]:
        """The leading run of hits (a prefix is only reusable up to its first missing block)."""
        prefix: list[memoryview] = []
        for block in self.get_blocks(model_id, hashes, layer_range, out):
            if block is None:
                break
            prefix.append(block)
        return prefix

    def lookup_prefix(self, model_id: str, hashes: list[int],
                      layer_range: tuple[int, int] | None = None) -> int:
        """How many leading blocks the store holds (no data moved). Without ``layer_range`` a block counts
        when any of its layer ranges is stored; with one, only that exact range counts."""
        if not hashes:
            return 0
        with self._lock:
            return self.transport.lookup(model_id, tuple(layer_range or ANY_LAYERS), list(hashes))[0]

    def abort(self) -> None:
        """Abort the transfer in progress (from another thread); it raises TransferError in its caller."""
        self.transport.abort()

    def close(self) -> None:
        with self._lock:
            self.transport.close()

    def __enter__(self) -> KvStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
