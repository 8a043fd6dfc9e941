"""CrescentConnector's bookkeeping, free of vLLM and torch: settings, per-request params, load/save plans, counters.

The scheduler half of the connector (vllm_connector_scheduler.py) keeps one ``RequestPlan`` per request that asked
for the store; these functions decide how many prompt tokens can be loaded and which full blocks are ready to save.
Positions are prompt token indices; a crescent block is ``block_size`` tokens (crescent's hashing block), which need
not equal vLLM's page size: slots are computed per token (``slots_for``), so any page size works.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

TRANSPORTS = ("tcp", "mooncake")


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config``, set by the engine when it builds vLLM (one per worker)."""

    internal_token: str = ""
    """The cluster's internal token; the kvstore's data port and the conductor require it when one is set."""
    timeout_s: float = 30.0
    """Timeout of one store transfer or lookup, and of a conductor RPC (seconds)."""
    block_size: int = 16
    """Tokens per store block: crescent's hashing block size (crescent.hashing.prefix_block_hashes)."""
    conductor_address: str = ""
    """The conductor's gRPC host:port; stored blocks are reported to it (ReportKvEvents). Empty = no events."""
    instance_id: str = ""
    """This worker's instance id at the conductor (the KV events name it)."""

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"CrescentConnector: unknown kv_connector_extra_config keys {unknown}; "
                             f"known: {sorted(known)}")
        cfg = cls(**extra)
        if not isinstance(cfg.block_size, int) or cfg.block_size <= 0:
            raise ValueError(f"CrescentConnector: block_size must be a positive int, got {cfg.block_size!r}")
        if cfg.timeout_s <= 0:
            raise ValueError(f"CrescentConnector: timeout_s must be positive, got {cfg.timeout_s!r}")
        if cfg.conductor_address and not cfg.instance_id:
            raise ValueError("CrescentConnector: conductor_address is set but instance_id is empty; "
                             "the KV events must name this worker")
        return cfg


@dataclass(frozen=True)
class TransferParams:
    """A request's ``kv_transfer_params`` (the contract the engine fills in)."""

    kvstore_address: str = ""
    kvstore_transport: str = "tcp"
    model_id: str = ""
    load: bool = False
    save: bool = False

    @property
    def active(self) -> bool:
        return bool(self.kvstore_address) and (self.load or self.save)

    @classmethod
    def parse(cls, raw: Any) -> TransferParams:
        """The request's params; ValueError with the reason when they are malformed (the connector then does
        nothing for the request and says why in its report; it never fails the engine)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"kv_transfer_params must be a dict, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        mine = {k: v for k, v in raw.items() if k in known}  # other connectors' keys (MultiConnector) pass by
        params = cls(**mine)
        for name in ("kvstore_address", "kvstore_transport", "model_id"):
            if not isinstance(getattr(params, name), str):
                raise ValueError(f"kv_transfer_params.{name} must be a string")
        for name in ("load", "save"):
            if not isinstance(getattr(params, name), bool):
                raise ValueError(f"kv_transfer_params.{name} must be a bool")
        if params.kvstore_transport not in TRANSPORTS:
            raise ValueError(f"kv_transfer_params.kvstore_transport must be one of {TRANSPORTS}, "
                             f"got {params.kvstore_transport!r}")
        if params.kvstore_address:
            host, sep, port = params.kvstore_address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"kv_transfer_params.kvstore_address must be host:port, "
                                 f"got {params.kvstore_address!r}")
        return params


def slots_for(block_ids: list[int], page_size: int, start: int, end: int) -> list[int]:
    """vLLM slot ids of prompt positions [start, end): position p lives in page ``block_ids[p // page_size]``."""
    return [block_ids[p // page_size] * page_size + p % page_size for p in range(start, end)]


def loadable_tokens(prompt_len: int, stored_blocks: int, block_size: int) -> int:
    """Tokens of the prompt the store can supply: whole stored blocks, never the last prompt token (vLLM must
    compute at least one token to sample from)."""
    return min(stored_blocks, max(prompt_len - 1, 0) // block_size) * block_size


@dataclass
class LoadSpec:
    """Worker order: write store blocks ``hashes`` into the slots of positions [start, end)."""

    req_id: str
    address: str
    transport: str
    model_id: str
    hashes: list[int]
    skip: int  # tokens of hashes[0] before ``start`` (already in vLLM's cache: a local prefix hit)
    slots: list[int]
    page_size: int


@dataclass
class SaveSpec:
    """Worker order: read positions of the blocks ``hashes`` from ``slots`` and put them in the store."""

    req_id: str
    address: str
    transport: str
    model_id: str
    hashes: list[int]
    slots: list[int]


@dataclass
class RequestPlan:
    """What the connector knows and has done for one request (scheduler side)."""

    params: TransferParams
    hashes: list[int]
    prompt_len: int
    block_size: int
    error: str = ""
    stored_blocks: int = 0  # leading blocks the store held at the lookup
    local_tokens: int = 0  # vLLM's own (block-aligned) prefix hit passed to the last lookup
    loaded_tokens: int = 0
    counted: bool = False  # the lookup outcome counted once (get_num_new_matched_tokens may run many times)
    block_ids: list[int] = field(default_factory=list)
    next_save: int = -1  # the first block not yet saved; -1 = not started (set from the lookup)
    stored_new: int = 0  # blocks this request's saves wrote
    save_failed: bool = False  # a save order came back short: which blocks made it is unknown

    def ready_to_save(self, computed_tokens: int) -> tuple[int, int]:
        """Blocks [first, last) whose tokens are all computed now and not saved yet (prompt blocks only)."""
        if self.next_save < 0:
            self.next_save = self.stored_blocks
        last = min(computed_tokens, self.prompt_len) // self.block_size
        last = min(last, len(self.hashes))
        return self.next_save, max(self.next_save, last)

    def report(self) -> dict[str, Any]:
        """The per-request report returned in the finished request's kv_transfer_params."""
        held = self.stored_blocks if self.save_failed else max(self.stored_blocks, self.next_save)
        out: dict[str, Any] = {"loaded_tokens": self.loaded_tokens, "stored_blocks": self.stored_new,
                               "store_hit_blocks": self.stored_blocks, "block_hashes": self.hashes[:held]}
        if self.error:
            out["error"] = self.error
        return out


COUNTER_NAMES = ("lookups", "lookup_misses", "lookup_errors", "loads", "loaded_tokens", "load_errors",
                 "saves", "stored_blocks", "save_errors", "events_reported")


@dataclass
class ConnectorCounters:
    """Running totals (each half keeps its own; vLLM's stats path sums them). ``lookups``: requests that asked to
    load; ``lookup_misses``: of those, the ones the store had nothing (usable) for; ``loads``/``loaded_tokens``:
    loads done by the worker; ``saves``: save orders done; ``stored_blocks``: blocks written to the store."""

    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    _reported: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] += n

    def delta(self) -> dict[str, int]:
        """What changed since the last call (vLLM's stats are per interval)."""
        out = {k: v - self._reported[k] for k, v in self.values.items() if v != self._reported[k]}
        self._reported = dict(self.values)
        return out


def sum_reports(reports: list[dict[str, Any] | None]) -> dict[str, int]:
    """Totals over finished requests' reports (``RequestOutput.kv_transfer_params``): the engine's counters."""
    out = {"requests": 0, "loaded_tokens": 0, "stored_blocks": 0, "load_hits": 0, "errors": 0}
    for r in reports:
        if not r:
            continue
        out["requests"] += 1
        out["loaded_tokens"] += int(r.get("loaded_tokens", 0))
        out["stored_blocks"] += int(r.get("stored_blocks", 0))
        out["load_hits"] += int(r.get("loaded_tokens", 0) > 0)
        out["errors"] += int("error" in r)
    return out
