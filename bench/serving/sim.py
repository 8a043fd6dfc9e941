"""Discrete-event simulator of a crescent cluster on a simulated clock, driven by a request trace.

Placement and early rejection are the conductor's own code (``crescent.services.conductor.scheduler.decide``),
fed each instance's load as of its last heartbeat (every ``heartbeat_interval_s``) plus the live conductor's
reservations for work placed since, and the real KvIndex, which the simulated caches and store update through KV
events. The simulated hardware runs at ``true_cost`` (default: the
same cost model the conductor plans with, a perfect predictor; the trace suite passes sim_hardware's
``MeasuredHardware`` instead, any object with the CostModel methods the machines call).
Simplifications (documented in the results): one prefill request at a time per prefill instance (unless
``prefill_batch_tokens`` batches them as crescent's engine does); the KV transfer prefill -> decode overlaps
prefill (Mooncake streams it layer by layer) and costs no extra time (unless ``decode_loads_kv``); a decode
instance reserves a request's whole KV (prompt + output) on admission instead of preempting.
"""

from __future__ import annotations

import copy
import heapq
import itertools
from dataclasses import dataclass, field

from bench.serving.sim_cluster import DecodeSim, Job, PrefillSim, SimStore, fast25_tbt
from bench.serving.trace import TraceRequest
from crescent.services.conductor.cluster import Placement, Request, Slo, Tier
from crescent.services.conductor.cost_model import CostModel
from crescent.services.conductor.kv_index import KvIndex
from crescent.services.conductor.ledger import Ledger
from crescent.services.conductor.scheduler import add_reservations, decide
from crescent.services.conductor.view import ClusterView


@dataclass
class SimConfig:
    n_prefill: int = 4
    n_decode: int = 4
    block_tokens: int = 512
    prefill_cache_blocks: int = 3000  # per prefill instance (its device cache)
    store_dram_blocks: int = 10_000
    store_ssd_blocks: int = 100_000
    decode_kv_tokens: int = 1_500_000  # per decode instance
    ttft_slo_s: float = 10.0
    tbt_slo_s: float = 0.1
    max_queue_per_instance: int = 32
    # Prefill batching: 0 = one request at a time (Mooncake's chunked prefill of a single request); > 0 = every
    # queued request that fits this many new tokens joins one batch, as crescent's engine schedules prefill.
    prefill_batch_tokens: int = 0
    # False: the prefill -> decode KV transfer overlaps prefill and is free (Mooncake streams it layer by layer).
    # True: a decode instance pulls each joining request's prompt KV from the store first, one after another, in
    # the step it joins (crescent's decode service fetches after prefill returns): cost.transfer_time(prompt, DRAM).
    decode_loads_kv: bool = False
    max_tokens: int = 2048  # the client's limit sent to the conductor (the true output length stays hidden)
    heartbeat_interval_s: float = 1.0  # load reports go stale this long (0 = exact load at every decision)
    policy: str = "mooncake"
    rejection: str = "none"
    kvcache_balancing_threshold: float = 2.0
    cost: CostModel = field(default_factory=CostModel)
    true_cost: CostModel | None = None


@dataclass(eq=False)
class RequestRecord:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    accepted: bool = False
    reject_reason: str = ""
    prefill_id: str = ""
    decode_id: str = ""
    cached_tokens: int = 0
    computed_tokens: int = 0
    predicted_ttft_s: float = 0.0
    first_token_s: float = 0.0
    ttft_s: float = 0.0
    tbt_s: float = 0.0
    finish_s: float = 0.0
    finished: bool = False
    decode_first_step: int = 0


class Simulator:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.true_cost = cfg.true_cost or cfg.cost
        self.index = KvIndex()
        self.ledger = Ledger()
        self.slo = Slo(cfg.ttft_slo_s, cfg.tbt_slo_s, cfg.max_queue_per_instance)
        self.prefill = {f"p{i}": PrefillSim(f"p{i}", cfg.prefill_cache_blocks, self.index, cfg.block_tokens)
                        for i in range(cfg.n_prefill)}
        self.decode = {f"d{i}": DecodeSim(f"d{i}", cfg.decode_kv_tokens, cfg.block_tokens)
                       for i in range(cfg.n_decode)}
        self.store = SimStore("s0", cfg.store_dram_blocks, cfg.store_ssd_blocks, self.index)
        self.events: list = []
        self._seq = itertools.count()
        self.placements = 0
        self.records: list[RequestRecord] = []
        self.reports: dict[str, object] | None = None  # last heartbeat's load of every instance

    def _push(self, t: float, kind: str, obj) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, obj))

    def run(self, trace: list[TraceRequest]) -> list[RequestRecord]:
        for i, req in enumerate(trace):
            self._push(req.arrival_s, "arrive", (i, req))
        if self.cfg.heartbeat_interval_s > 0 and trace:
            self._push(0.0, "heartbeat", None)
        pending = len(trace)
        while self.events:
            t, _, kind, obj = heapq.heappop(self.events)
            if kind == "heartbeat":
                self._heartbeat(t)
                if pending or any(x.busy or x.queue for x in self.prefill.values()) or any(
                        d.stepping for d in self.decode.values()):
                    self._push(t + self.cfg.heartbeat_interval_s, "heartbeat", None)
            elif kind == "arrive":
                pending -= 1
                self._arrive(t, *obj)
            elif kind == "prefill_done":
                self._prefill_done(t, obj)
            else:
                self._decode_step_end(t, *obj)
        return self.records

    # --- arrival: the conductor decides -------------------------------------------------------------------------
    def _heartbeat(self, t: float) -> None:
        self.reports = {"prefill": [p.state(t) for p in self.prefill.values()],
                        "decode": [d.state(t) for d in self.decode.values()]}
        for d in self.reports["decode"]:  # as the live conductor does with each decode heartbeat (observe_heartbeat)
            if d.load.running > 0:
                self.ledger.observe_decode(d.instance_id, self.cfg.cost.decode_step_time(
                    d.load.running, d.load.running_context_tokens), t)

    def _view(self, now: float) -> ClusterView:
        if self.reports is None:  # exact load, as if every instance had just reported
            prefill = [p.state(now) for p in self.prefill.values()]
            decode = [d.state(now) for d in self.decode.values()]
        else:
            prefill = add_reservations([copy.copy(s) for s in self.reports["prefill"]], self.ledger, now)
            decode = add_reservations([copy.copy(s) for s in self.reports["decode"]], self.ledger, now)
        return ClusterView(prefill=prefill, decode=decode, kvstore=[self.store.state()],
                           index=self.index, cost=self.cfg.cost, ledger=self.ledger, now=now, seq=self.placements,
                           kvcache_balancing_threshold=self.cfg.kvcache_balancing_threshold, slo=self.slo)

    def _arrive(self, t: float, i: int, tr: TraceRequest) -> None:
        rec = RequestRecord(i, t, tr.input_length, tr.output_length)
        self.records.append(rec)
        hashes = tr.full_block_hashes(self.cfg.block_tokens)
        req = Request(str(i), tr.input_length, self.cfg.max_tokens, hashes, self.cfg.block_tokens)
        result = decide(self._view(t), req, self.cfg.policy, self.cfg.rejection, self.slo)
        if not isinstance(result, Placement):
            rec.reject_reason = result.reason
            return
        self.placements += 1
        rec.accepted, rec.prefill_id, rec.decode_id = True, result.prefill.instance_id, result.decode.instance_id
        rec.predicted_ttft_s = result.predicted_ttft_s
        source = result.replicate_from or result.prefix_source
        job = Job(rec, hashes, result.cached_blocks, source,
                  tr.input_length - result.cached_blocks * self.cfg.block_tokens)
        inst = self.prefill[rec.prefill_id]
        inst.queue.append(job)
        if inst.busy is None:
            self._start_prefill(t, inst)

    # --- prefill -------------------------------------------------------------------------------------------------
    def _reuse(self, inst: PrefillSim, job: Job) -> tuple[int, float]:
        """Blocks actually reusable when the job starts (caches may have changed since placement) and the time to
        bring them in."""
        bs, cost = self.cfg.block_tokens, self.true_cost
        cap = min(job.planned_blocks, (job.rec.prompt_tokens - 1) // bs)
        own = min(inst.cache.prefix_len(job.hashes), cap)
        if job.source == self.store.id:
            tiers = self.store.prefix_tiers(job.hashes[:cap])
            if len(tiers) > own:
                self.store.put(job.hashes[own:len(tiers)])  # a hit promotes SSD blocks back to DRAM
                return len(tiers), cost.tiers_transfer_time(tiers[own:], bs)
        elif job.source in self.prefill and job.source != inst.id:
            n = min(self.prefill[job.source].cache.prefix_len(job.hashes), cap)
            if n > own:
                return n, cost.transfer_time((n - own) * bs, Tier.DEVICE)
        return own, 0.0

    def _start_prefill(self, t: float, inst: PrefillSim) -> None:
        jobs = [inst.queue.popleft()]
        budget = self.cfg.prefill_batch_tokens - jobs[0].new_tokens
        computing, deferred = set(jobs[0].hashes), []
        while inst.queue and inst.queue[0].new_tokens <= budget:  # the engine's token budget per forward pass
            job = inst.queue.popleft()
            own = inst.cache.prefix_len(job.hashes)
            if own < len(job.hashes) and job.hashes[own] in computing:
                deferred.append(job)  # as the engine does: it waits for the prefix this batch computes
                continue
            budget -= job.new_tokens
            jobs.append(job)
            computing.update(job.hashes)
        inst.queue.extendleft(reversed(deferred))
        # A batch costs what its requests cost one by one (each with its fixed cost: on CPU the per-request work
        # of the services serializes too), but every request in it gets its first token when the batch ends.
        duration = sum(self._job_time(inst, job) for job in jobs)
        jobs[0].duration = duration
        inst.busy, inst.riders, inst.busy_since, inst.busy_until = jobs[0], jobs[1:], t, t + duration
        self._push(inst.busy_until, "prefill_done", inst)

    def _job_time(self, inst: PrefillSim, job: Job) -> float:
        blocks, transfer = self._reuse(inst, job)
        rec, bs = job.rec, self.cfg.block_tokens
        rec.cached_tokens = blocks * bs
        rec.computed_tokens = rec.prompt_tokens - rec.cached_tokens
        return transfer + self.true_cost.prefill_time(rec.computed_tokens, rec.cached_tokens)

    def _prefill_done(self, t: float, inst: PrefillSim) -> None:
        jobs, inst.busy, inst.riders = [inst.busy, *inst.riders], None, []
        for job in jobs:
            self._first_token(t, inst, job)
        if inst.queue:
            self._start_prefill(t, inst)

    def _first_token(self, t: float, inst: PrefillSim, job: Job) -> None:
        rec = job.rec
        inst.cache.insert(job.hashes)
        self.store.put(job.hashes)  # every full block goes to the store (Mooncake writes new KV back)
        rec.first_token_s, rec.ttft_s = t, t - rec.arrival_s
        if rec.output_tokens <= 1:
            self._finish(t, rec, [])
        else:
            dec = self.decode[rec.decode_id]
            dec.waiting.append(rec)
            if not dec.stepping:
                self._start_step(t, dec)

    # --- decode --------------------------------------------------------------------------------------------------
    def _start_step(self, t: float, dec: DecodeSim) -> None:
        joined = dec.admit()
        if not dec.running:
            dec.stepping = False
            return
        dec.stepping = True
        dur = dec.step_time(self.true_cost)
        if self.cfg.decode_loads_kv:  # each joiner's prompt KV is pulled from the store before this step runs
            dur += sum(self.true_cost.transfer_time(r.prompt_tokens, Tier.DRAM) for r in joined)
        self._push(t + dur, "decode_step", (dec, dur))

    def _decode_step_end(self, t: float, dec: DecodeSim, dur: float) -> None:
        for rec in dec.end_step(t, dur):
            self._finish(t, rec, dec.gaps(rec))
        self._start_step(t, dec)

    def _finish(self, t: float, rec: RequestRecord, gaps: list[float]) -> None:
        rec.finished, rec.finish_s, rec.tbt_s = True, t, fast25_tbt(gaps)
        mean_gap = sum(gaps) / len(gaps) if gaps else None  # what the gateway's Finish reports, with the TTFT
        self.ledger.finish(str(rec.index), rec.output_tokens, mean_gap, now=t, ttft_s=rec.ttft_s)


def simulate(trace: list[TraceRequest], cfg: SimConfig) -> list[RequestRecord]:
    return Simulator(cfg).run(trace)
