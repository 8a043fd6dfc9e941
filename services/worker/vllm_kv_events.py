"""vLLM's own KV-cache events, relayed to the conductor in crescent's block hashes.

vLLM's engine core publishes, per step, the pages it added to its prefix cache (``BlockStored``: vLLM's page hashes,
the parent page's hash and the pages' token ids) and the pages it evicted (``BlockRemoved``: page hashes only), over
ZMQ (``KVEventsConfig(enable_kv_cache_events=True, publisher="zmq")``: the interface llm-d and Dynamo read too).
vLLM's page hashes are not crescent's block hashes (another function, another block size), so ``VllmBlockMap``
recomputes crescent's chained hashes from each stored page's tokens and remembers which blocks each page holds; an
eviction then names crescent's blocks, and the conductor's index stops sending prefix-sharing requests to a worker
that no longer has them.

``KvEventRelay`` runs in the worker process (vLLM's engine core binds the PUB socket on an ``ipc://`` path, the relay's
SUB thread connects): it decodes each batch with vLLM's own types and hands (kind, hashes) to a callback. Losing an
event costs placement quality, never a wrong answer, so every failure here is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

from crescent.hashing import chain_hash, model_seed
from crescent.services.common import metrics as m
from crescent.services.worker.conductor_link import ConductorLink

log = logging.getLogger(__name__)

STORED, EVICTED = "stored", "evicted"
KvEventSink = Callable[[str, list[int]], None]
"""Called with (STORED or EVICTED, crescent block hashes) from the relay's thread."""
POLL_MS = 200  # how often the relay's thread looks at its stop flag


def kv_events_endpoint(instance_id: str) -> str:
    """A fresh ``ipc://`` endpoint for one engine's events (vLLM binds what starts with ipc://; a tcp address it
    would connect to instead). On Linux in the abstract namespace (``@``): no socket file is left behind when the
    worker is killed, or even when vLLM shuts down (it does not remove the file)."""
    safe = "".join(c if c.isalnum() else "-" for c in instance_id)[:40]
    where = "@" if sys.platform.startswith("linux") else tempfile.gettempdir() + "/"
    return f"ipc://{where}crescent-kv-events-{safe}-{os.getpid()}"


class VllmBlockMap:
    """vLLM page hash -> the crescent block hashes that page holds (pages of ``page_size`` tokens, blocks of
    ``block_size``; the page size must be a multiple of the block size, as crescent configures vLLM)."""

    def __init__(self, model_id: str, block_size: int, page_size: int):
        if block_size <= 0 or page_size % block_size:
            raise ValueError(f"vLLM's page of {page_size} tokens is not a whole number of crescent blocks of "
                             f"{block_size}: set vllm_block_size to a multiple of kv_block_size")
        self.seed = model_seed(model_id)
        self.block_size = block_size
        self.page_size = page_size
        self.pages: dict[Any, tuple[int, ...]] = {}

    def stored(self, page_hashes: Sequence[Any], parent: Any, token_ids: Sequence[int]) -> list[int]:
        """Remember the pages of one BlockStored event; returns their crescent hashes (empty when the parent page
        is unknown: its blocks' chain cannot be computed, and vLLM never caches a page without its parent)."""
        chain = self.seed if parent is None else self._last(parent)
        if chain is None:
            return []
        out: list[int] = []
        for i, page in enumerate(page_hashes):
            tokens = token_ids[i * self.page_size:(i + 1) * self.page_size]
            if len(tokens) < self.page_size:  # vLLM hashes full pages only; a short tail is not a cached page
                break
            blocks = []
            for j in range(0, self.page_size, self.block_size):
                chain = chain_hash(chain, tokens[j:j + self.block_size])
                blocks.append(chain)
            self.pages[page] = tuple(blocks)
            out += blocks
        return out

    def removed(self, page_hashes: Sequence[Any]) -> list[int]:
        """Forget evicted pages; returns the crescent hashes they held (pages never seen stored are skipped)."""
        return [h for page in page_hashes for h in self.pages.pop(page, ())]

    def cleared(self) -> list[int]:
        """vLLM dropped its whole prefix cache (a reset): every known block is gone."""
        gone = [h for blocks in self.pages.values() for h in blocks]
        self.pages.clear()
        return gone

    def _last(self, page: Any) -> int | None:
        blocks = self.pages.get(page)
        return blocks[-1] if blocks else None


class KvEventRelay:
    """A daemon thread: vLLM's event batches from ``endpoint`` -> ``VllmBlockMap`` -> ``sink``."""

    def __init__(self, endpoint: str, blocks: VllmBlockMap, sink: KvEventSink):
        import zmq

        self.endpoint = endpoint
        self.blocks = blocks
        self.sink = sink
        self.batches = 0
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            try:
                if not self._socket.poll(POLL_MS):
                    continue
                _topic, _seq, payload = self._socket.recv_multipart()
                self.handle(decoder.decode(payload))
            except Exception:  # a bad batch or a closed socket: log and go on (or stop, when asked to)
                if self._stop.is_set():
                    return
                log.exception("vLLM KV event batch dropped")

    def handle(self, batch: Any) -> None:
        """Map one vLLM ``KVEventBatch`` and tell the sink, in order; a run of events of one kind (vLLM sends one
        per evicted page) goes as one call."""
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        self.batches += 1
        run_kind, run = STORED, []
        for event in batch.events:
            if isinstance(event, BlockStored):
                if event.block_size != self.blocks.page_size:
                    continue  # another cache group's pages (not crescent's attention KV)
                kind, hashes = STORED, self.blocks.stored(event.block_hashes, event.parent_block_hash,
                                                          event.token_ids)
            elif isinstance(event, BlockRemoved):
                kind, hashes = EVICTED, self.blocks.removed(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                kind, hashes = EVICTED, self.blocks.cleared()
            else:
                continue
            if kind != run_kind and run:
                self.sink(run_kind, run)
                run = []
            run_kind, run = kind, run + hashes
        if run:
            self.sink(run_kind, run)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * POLL_MS / 1000 + 1)
        self._socket.close(linger=0)


class KvEventForwarder:
    """The relay's events to the conductor through the worker's link, in vLLM's order (one sender on the worker's
    event loop: an eviction overtaking the store it undoes would leave the index wrong)."""

    def __init__(self, endpoint: str, blocks: VllmBlockMap, link: ConductorLink, model_id: str, role: str = ""):
        self.link = link
        self.model_id = model_id
        self.role = role
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, list[int]]] = asyncio.Queue()
        self._task = asyncio.create_task(self._send(), name="vllm-kv-events")
        self.relay = KvEventRelay(endpoint, blocks, self._from_thread)

    def _from_thread(self, kind: str, hashes: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, hashes))

    async def _send(self) -> None:
        while True:
            kind, hashes = await self._queue.get()
            report = self.link.report_stored if kind == STORED else self.link.report_evicted
            await report(self.model_id, hashes)
            m.WORKER_VLLM_KV_EVENT_BLOCKS.labels(self.role, kind).inc(len(hashes))

    async def aclose(self) -> None:
        await asyncio.to_thread(self.relay.close)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def forward_kv_events(engine: Any, link: ConductorLink, block_size: int, role: str) -> KvEventForwarder | None:
    """Start relaying ``engine``'s KV-cache events to the conductor; None when it publishes none (crescent's engine,
    vLLM without prefix caching) or its pages do not hold whole crescent blocks (logged)."""
    endpoint = getattr(engine, "kv_events_endpoint", "")
    if not endpoint:
        return None
    try:
        blocks = VllmBlockMap(engine.model_id, block_size, engine.page_size)
    except ValueError as exc:
        log.warning("vLLM's KV events are not relayed: %s", exc)
        return None
    return KvEventForwarder(endpoint, blocks, link, engine.model_id, role)
