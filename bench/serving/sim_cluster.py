"""Simulated instances: prefill workers with a local prefix cache, decode workers with continuous batching, and a
KV store with an LRU DRAM tier demoting into an LRU SSD tier. Every cache change is reported to the conductor's
real KvIndex as the live services would (STORED / MOVED / EVICTED events).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from crescent.services.conductor.cluster import InstanceInfo, InstanceState, Load, Role, Tier
from crescent.services.conductor.cost_model import CostModel
from crescent.services.conductor.kv_index import KvEventKind, KvIndex


class LruBlocks:
    """A fixed number of blocks with LRU eviction; ``on_evict`` gets each evicted hash."""

    def __init__(self, owner: str, tier: Tier, capacity: int, index: KvIndex, on_evict=None) -> None:
        self.owner, self.tier, self.capacity, self.index = owner, tier, capacity, index
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.on_evict = on_evict

    def prefix_len(self, hashes: tuple[int, ...]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def insert(self, hashes: tuple[int, ...] | list[int], announce: bool = True) -> None:
        new = []
        for h in hashes:
            if h in self.blocks:
                self.blocks.move_to_end(h)
            else:
                self.blocks[h] = None
                new.append(h)
        if new and announce:
            self.index.apply(self.owner, KvEventKind.STORED, new, self.tier)
        self._evict()

    def remove(self, h: int) -> None:
        self.blocks.pop(h, None)

    def _evict(self) -> None:
        while len(self.blocks) > self.capacity:
            h, _ = self.blocks.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(h)
            else:
                self.index.apply(self.owner, KvEventKind.EVICTED, [h], self.tier)


class SimStore:
    """DRAM tier in front of an SSD tier: DRAM evictions demote to SSD, a hit on SSD promotes back to DRAM."""

    def __init__(self, store_id: str, dram_blocks: int, ssd_blocks: int, index: KvIndex) -> None:
        self.id, self.index = store_id, index
        self.ssd = LruBlocks(store_id, Tier.SSD, ssd_blocks, index)
        self.dram = LruBlocks(store_id, Tier.DRAM, dram_blocks, index, on_evict=self._demote)

    def _demote(self, h: int) -> None:
        if self.ssd.capacity <= 0:
            self.index.apply(self.id, KvEventKind.EVICTED, [h], Tier.DRAM)
            return
        self.ssd.insert([h], announce=False)
        self.index.apply(self.id, KvEventKind.MOVED, [h], Tier.SSD, Tier.DRAM)

    def prefix_tiers(self, hashes: tuple[int, ...]) -> list[Tier]:
        out = []
        for h in hashes:
            if h in self.dram.blocks:
                out.append(Tier.DRAM)
            elif h in self.ssd.blocks:
                out.append(Tier.SSD)
            else:
                break
        return out

    def put(self, hashes: tuple[int, ...]) -> None:
        """Write (or re-read: promote) blocks into DRAM."""
        for h in hashes:
            if h in self.ssd.blocks:
                self.ssd.remove(h)
                self.index.apply(self.id, KvEventKind.MOVED, [h], Tier.DRAM, Tier.SSD)
                self.dram.insert([h], announce=False)
            else:
                self.dram.insert([h])

    def state(self) -> InstanceState:
        return InstanceState(InstanceInfo(self.id, Role.KVSTORE), Load())


@dataclass
class Job:
    rec: object  # sim.RequestRecord
    hashes: tuple[int, ...]
    planned_blocks: int
    source: str
    new_tokens: int  # as planned; the actual count is decided when the job starts
    duration: float = 0.0


class PrefillSim:
    """One prefill request at a time, FCFS (chunked prefill of a single request, as in Mooncake)."""

    def __init__(self, iid: str, cache_blocks: int, index: KvIndex, block_tokens: int) -> None:
        self.id = iid
        self.cache = LruBlocks(iid, Tier.DEVICE, cache_blocks, index)
        self.queue: deque[Job] = deque()
        self.busy: Job | None = None
        self.riders: list[Job] = []  # batched with busy (SimConfig.prefill_batch_tokens); they finish with it
        self.busy_since = self.busy_until = 0.0
        self.block_tokens = block_tokens

    def state(self, now: float) -> InstanceState:
        queued = sum(j.new_tokens for j in self.queue)
        if self.busy is not None and self.busy_until > self.busy_since:
            left = (self.busy_until - now) / (self.busy_until - self.busy_since)
            queued += int(sum(j.new_tokens for j in (self.busy, *self.riders)) * max(0.0, left))
        running = 1 + len(self.riders) if self.busy is not None else 0
        load = Load(waiting=len(self.queue) + running, queued_prefill_tokens=queued)
        return InstanceState(InstanceInfo(self.id, Role.PREFILL, kv_block_size=self.block_tokens), load,
                             last_heartbeat=now)


@dataclass
class DecodeSim:
    """Continuous batching: each step decodes one token for every running request; joins happen between steps."""

    id: str
    kv_tokens: int
    block_tokens: int
    waiting: deque = field(default_factory=deque)
    running: dict = field(default_factory=dict)  # rec -> last step index it runs
    ends: list[float] = field(default_factory=list)  # end time of step k
    durs: list[float] = field(default_factory=list)
    finishing: list = field(default_factory=list)  # heap (last step, request index, rec)
    context: int = 0
    used_tokens: int = 0
    stepping: bool = False

    def state(self, now: float) -> InstanceState:
        total = self.kv_tokens // self.block_tokens
        free = max(0, (self.kv_tokens - self.used_tokens) // self.block_tokens)
        load = Load(waiting=len(self.waiting), running=len(self.running), free_kv_blocks=free, total_kv_blocks=total,
                    running_context_tokens=self.context)
        return InstanceState(InstanceInfo(self.id, Role.DECODE, kv_block_size=self.block_tokens), load,
                             last_heartbeat=now)

    def admit(self) -> list:
        """Move waiting requests into the batch while their KV (prompt + output) fits; return those moved."""
        admitted = []
        while self.waiting:
            rec = self.waiting[0]
            need = rec.prompt_tokens + rec.output_tokens
            if self.running and self.used_tokens + need > self.kv_tokens:
                break
            self.waiting.popleft()
            first = len(self.durs)  # the step about to run
            last = first + rec.output_tokens - 2  # output_tokens - 1 decode steps (prefill made the first)
            rec.decode_first_step = first
            self.running[rec] = last
            heapq.heappush(self.finishing, (last, rec.index, rec))
            self.context += rec.prompt_tokens + 1
            self.used_tokens += need
            admitted.append(rec)
        return admitted

    def step_time(self, cost: CostModel) -> float:
        return cost.decode_step_time(len(self.running), self.context)

    def end_step(self, t: float, dur: float) -> list:
        """Close the step now ending; return the requests that produced their last token in it."""
        k = len(self.durs)
        self.durs.append(dur)
        self.ends.append(t)
        self.context += len(self.running)
        done = []
        while self.finishing and self.finishing[0][0] == k:
            _, _, rec = heapq.heappop(self.finishing)
            del self.running[rec]
            self.context -= rec.prompt_tokens + rec.output_tokens
            self.used_tokens -= rec.prompt_tokens + rec.output_tokens
            done.append(rec)
        return done

    def gaps(self, rec) -> list[float]:
        """Token gaps of a finished request: first decode token vs prefill's token, then one per step."""
        first, last = rec.decode_first_step, self.running_last(rec)
        return [self.ends[first] - rec.first_token_s] + self.durs[first + 1: last + 1]

    @staticmethod
    def running_last(rec) -> int:
        return rec.decode_first_step + rec.output_tokens - 2


def fast25_tbt(gaps: list[float], slowest_fraction: float = 0.1) -> float:
    """TBT as in Mooncake FAST'25: the mean of the slowest 10% of a request's token gaps."""
    if not gaps:
        return 0.0
    k = max(1, math.ceil(len(gaps) * slowest_fraction))
    return sum(sorted(gaps, reverse=True)[:k]) / k
