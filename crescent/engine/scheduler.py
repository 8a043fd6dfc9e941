"""The batch scheduler: which sequences run in the next forward pass, and how many of their tokens (pure, no torch).

Policy (vLLM v1 style, one token budget per step): running sequences first, oldest first -- each decodes one token
or continues its chunked prefill; when blocks run out the youngest running sequence is preempted (its blocks freed,
recomputed later). Then, if nothing was preempted, waiting sequences are admitted in arrival order, their prompt
served from the prefix cache as far as it hits and the rest chunked to fit the remaining budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from crescent.engine.block_manager import BlockManager
from crescent.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences in one batch."""
    max_num_batched_tokens: int = 2048
    """Token budget of one forward pass (prefill chunks + decodes)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int
    """Tokens computed for it this step: ``seq.token_ids[start : start + num_new]``."""
    start: int = -1
    """``seq.num_computed`` when scheduled (postprocess advances the sequence, not this)."""
    samples: bool = False
    """True when this step reaches the end of its known tokens, so its last position yields the next token."""

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed
        self.samples = self.start + self.num_new == self.seq.num_tokens


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def kind(self) -> str:
        """prefill, decode or mixed (a metrics label)."""
        decodes = sum(1 for s in self.seqs if s.num_new == 1 and s.seq.num_computed >= s.seq.prompt_len)
        return "decode" if decodes == len(self.seqs) else ("prefill" if decodes == 0 else "mixed")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        scheduled: list[Sequence] = []
        while self.running and budget > 0:
            seq = self.running.popleft()
            num_new = min(seq.num_uncomputed, budget)
            while not self.bm.grow(seq, seq.num_computed + num_new):
                if self.running:
                    self._preempt(self.running.pop(), batch)  # youngest first
                else:
                    self._preempt(seq, batch)
                    break
            else:
                scheduled.append(seq)
                batch.seqs.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        self.running.extendleft(reversed(scheduled))  # keep arrival order: scheduled ones are the oldest
        return budget

    def _pending_blocks(self) -> set[int]:
        """Hashes of the full prompt blocks running sequences compute but have not committed to the prefix cache."""
        return {h for seq in self.running for h in self._new_pending(seq)}

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        # A waiting prompt whose next uncached block a running prompt is computing waits for it: admitted now it
        # would compute the shared prefix again (a burst of 8 prompts behind one 770-token prefix computed it 8 times,
        # and the prefill behind them took ~8x as long); one step later it reads it from the cache.
        pending, deferred = self._pending_blocks(), []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.lookup(seq)
            if pending and len(hits) < len(seq.block_hashes) and seq.block_hashes[len(hits)] in pending:
                deferred.append(self.waiting.popleft())
                continue
            num_new = min(seq.num_tokens - len(hits) * self.bm.block_size, budget)
            if not self.bm.can_admit(hits, len(hits) * self.bm.block_size + num_new):
                break
            self.waiting.popleft()
            self.bm.take(seq, hits)
            grown = self.bm.grow(seq, seq.num_computed + num_new)
            assert grown, "can_admit() promised the blocks"
            if not seq.admitted_once:  # count each prompt once, not again after a preemption
                seq.admitted_once = True
                seq.num_cached_tokens = seq.num_computed
                self.prefix_query_tokens += seq.prompt_len
                self.prefix_hit_tokens += seq.num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            pending.update(self._new_pending(seq))
        self.waiting.extendleft(reversed(deferred))  # they keep their place at the head, in arrival order

    def _new_pending(self, seq: Sequence) -> list[int]:
        """The full prompt blocks ``seq`` computes from here on and has not committed: later prompts wait for them."""
        if not self.bm.enable_prefix_caching:
            return []
        full = seq.prompt_len // self.bm.block_size
        return self.bm.hashes(seq, full)[seq.num_committed_blocks:] if seq.num_committed_blocks < full else []

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.bm.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        batch.preempted.append(seq)

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """Advance every scheduled sequence by its computed tokens and append its sampled token (if any)."""
        for item, token in zip(batch.seqs, sampled, strict=True):
            seq = item.seq
            seq.num_computed += item.num_new
            self.bm.commit(seq)
            if token is not None:
                seq.token_ids.append(token)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out of the batch; its blocks are freed unless it holds its KV for export."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if not seq.hold_kv:
            self.bm.free(seq)
