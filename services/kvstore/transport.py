"""The client side of a bulk transport, one interface for every backend (``tcp``, ``mooncake``).

Shaped after SGLang's disaggregation ``conn``: each batched put or get is a :class:`Transfer` with an explicit
state (PENDING -> TRANSFERRING -> SUCCESS | FAILED), a deadline, ``abort()`` callable from another thread, and
one ``crescent_kvstore_transfer_seconds{transport,op}`` observation. After a failed or aborted transfer the
connection's framing is unknown, so the backend drops it and reconnects on the next call.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from crescent.services.common import metrics


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"


class TransferError(RuntimeError):
    """A transfer failed (connection lost, timed out, aborted, or refused by the server)."""


class ServerError(TransferError):
    """The server refused the request with a message (bad sizes, bad layer range, malformed frame)."""


class Transfer:
    """One batched operation's lifecycle."""

    def __init__(self, transport: str, op: str, timeout_s: float, on_abort: Callable[[], None] | None = None):
        self.transport, self.op, self.timeout_s = transport, op, timeout_s
        self.state = TransferState.PENDING
        self.error: str = ""
        self._on_abort = on_abort
        self._aborted = threading.Event()
        self.deadline = time.monotonic() + timeout_s

    def poll(self) -> TransferState:
        return self.state

    def abort(self) -> None:
        """Fail the transfer from any thread; the blocked socket call returns with an error."""
        self._aborted.set()
        if self._on_abort is not None:
            self._on_abort()

    def check(self) -> None:
        """Raise if aborted or past the deadline (called between blocks of a batch)."""
        if self._aborted.is_set():
            raise TransferError(f"{self.transport} {self.op} aborted")
        if time.monotonic() > self.deadline:
            raise TransferError(f"{self.transport} {self.op} timed out after {self.timeout_s:.1f}s")

    def run(self, body: Callable[[Transfer], object]):
        self.state = TransferState.TRANSFERRING
        started = time.perf_counter()
        try:
            result = body(self)
            self.check()
        except ServerError as exc:
            self.state, self.error = TransferState.FAILED, str(exc)
            raise
        except (OSError, ConnectionError, TransferError, ValueError) as exc:
            self.state = TransferState.FAILED
            self.error = f"{self.transport} {self.op} aborted" if self._aborted.is_set() else str(exc)
            raise TransferError(self.error) from exc
        metrics.STORE_TRANSFER_SECONDS.labels(self.transport, self.op).observe(time.perf_counter() - started)
        self.state = TransferState.SUCCESS
        return result


@dataclass(slots=True)
class FetchedBlock:
    data: memoryview
    meta: bytes


class TransportClient(ABC):
    """A connection to one kvstore's data address. Not thread-safe: :class:`KvStoreClient` serializes
    calls."""

    name: str = ""

    def __init__(self) -> None:
        self.current: Transfer | None = None

    @abstractmethod
    def put(self, model_id: str, layer_range: tuple[int, int], hashes: list[int], blocks: list[memoryview],
            metas: list[bytes]) -> list[int]:
        """Store the blocks; one :class:`protocol.BlockStatus` per block."""

    @abstractmethod
    def get(self, model_id: str, layer_range: tuple[int, int], hashes: list[int],
            out: memoryview | None = None) -> list[FetchedBlock | None]:
        """Fetch the blocks (None = miss); into ``out`` back to back when given, else into fresh buffers."""

    @abstractmethod
    def lookup(self, model_id: str, layer_range: tuple[int, int], hashes: list[int]) -> tuple[int, list[int]]:
        """(leading blocks present, each block's tier number)."""

    @abstractmethod
    def close(self) -> None: ...

    def abort(self) -> None:
        """Abort the transfer in progress, if any."""
        if self.current is not None:
            self.current.abort()
