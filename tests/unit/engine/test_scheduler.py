"""Block manager and scheduler as pure state machines (no model): prefix hits, ref counts, LRU, chunking, preemption."""

from __future__ import annotations

import pytest

from crescent.engine.block_manager import BlockManager
from crescent.engine.sampling_params import SamplingParams
from crescent.engine.scheduler import Scheduler, SchedulerConfig
from crescent.engine.sequence import Sequence, SequenceStatus
from crescent.hashing import prefix_block_hashes

BS = 4


def seq(rid: str, tokens: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens))


def step(sched: Scheduler, token: int = 5):
    """One fake engine step: every sampling sequence 'generates' ``token``."""
    batch = sched.schedule()
    sched.postprocess(batch, [token if s.samples else None for s in batch.seqs])
    return batch


def test_hashes_equal_the_cluster_definition():
    bm = BlockManager(8, BS, model_id="m")
    s = seq("a", list(range(11)))
    assert bm.hashes(s, 2) == prefix_block_hashes(list(range(11)), BS, "m")


def test_prefix_hit_and_ref_counts():
    bm = BlockManager(16, BS)
    sched = Scheduler(SchedulerConfig(), bm)
    a = seq("a", list(range(10)))
    sched.add(a)
    step(sched)
    assert a.num_computed == 10 and a.num_committed_blocks == 2
    b = seq("b", list(range(8)) + [50, 51, 52])
    sched.add(b)
    batch = step(sched)
    assert [(s.seq.request_id, s.num_new) for s in batch.seqs] == [("a", 1), ("b", 3)]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_count[x] for x in a.block_table[:2]] == [2, 2]
    assert sched.prefix_query_tokens == 21 and sched.prefix_hit_tokens == 8
    sched.finish(a)
    assert [bm.ref_count[x] for x in b.block_table[:2]] == [1, 1]
    sched.finish(b)
    assert bm.num_free == 16 and len(bm.cached_free) >= 2  # hashed blocks kept for reuse


def test_full_prompt_hit_still_computes_the_last_token():
    bm = BlockManager(16, BS)
    sched = Scheduler(SchedulerConfig(), bm)
    a = seq("a", list(range(8)))
    sched.add(a)
    step(sched)
    sched.finish(a)
    b = seq("b", list(range(8)))
    sched.add(b)
    batch = step(sched)
    assert b.num_cached_tokens == 4 and batch.seqs[0].num_new == 4  # 1 of 2 blocks: the last token is recomputed


def test_freed_cached_blocks_are_recycled_least_recent_first():
    bm = BlockManager(4, BS)
    sched = Scheduler(SchedulerConfig(), bm)
    for rid, base in (("a", 0), ("b", 100)):
        s = seq(rid, [base + i for i in range(BS)] + [1])
        sched.add(s)
        step(sched)
        sched.finish(s)
    assert bm.cached_prefix_blocks(prefix_block_hashes(list(range(BS)), BS)) == 1
    c = seq("c", [200 + i for i in range(3 * BS)])  # needs 3 blocks: 2 empty + the oldest cached one (a's)
    sched.add(c)
    step(sched)
    assert bm.cached_prefix_blocks(prefix_block_hashes(list(range(BS)), BS)) == 0
    assert bm.cached_prefix_blocks(prefix_block_hashes([100 + i for i in range(BS)], BS)) == 1


def test_chunked_prefill_samples_only_at_the_end():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=6), BlockManager(16, BS))
    a = seq("a", list(range(15)))
    sched.add(a)
    chunks = []
    for _ in range(3):
        batch = step(sched)
        chunks.append((batch.seqs[0].num_new, batch.seqs[0].samples))
    assert chunks == [(6, False), (6, False), (3, True)]
    assert a.num_tokens == 16 and a.num_computed == 15


def test_decode_gets_priority_and_budget_is_shared():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=5), BlockManager(16, BS))
    sched.add(seq("a", [1, 2]))
    step(sched)
    sched.add(seq("b", list(range(20))))
    batch = step(sched)
    assert [(s.seq.request_id, s.num_new) for s in batch.seqs] == [("a", 1), ("b", 4)]


def test_max_num_seqs():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(16, BS))
    for r in "abc":
        sched.add(seq(r, [1, 2, 3]))
    batch = step(sched)
    assert len(batch.seqs) == 2 and len(sched.waiting) == 1


def test_preemption_youngest_first_and_recompute():
    bm = BlockManager(3, BS)
    sched = Scheduler(SchedulerConfig(), bm)
    a, b = seq("a", [1, 2, 3, 4]), seq("b", [9, 8, 7, 6, 5, 4, 3])  # a: 1 block, b: 2 blocks -> pool full
    sched.add(a)
    sched.add(b)
    step(sched)
    assert bm.num_free == 0
    step(sched)  # a's 5th token needs a block: none free -> b (youngest) is preempted, a decodes
    assert sched.num_preemptions == 1 and b.status == SequenceStatus.WAITING and b.block_table == []
    assert list(sched.running) == [a] and b.num_computed == 0
    sched.finish(a)
    batch = step(sched)  # b comes back and recomputes its prompt + its output so far
    assert batch.seqs[0].seq is b and batch.seqs[0].samples
    assert b.num_cached_tokens == 0 and batch.seqs[0].start + batch.seqs[0].num_new == 8  # prompt + 1 output


def test_lone_sequence_that_cannot_grow_preempts_itself():
    bm = BlockManager(1, BS)
    sched = Scheduler(SchedulerConfig(), bm)
    a = seq("a", [1, 2, 3, 4])
    sched.add(a)
    batch = step(sched)
    assert a.num_computed == 3 or batch.seqs  # admitted with one block for 4 tokens
    batch = step(sched)  # token 5 needs a second block
    assert batch.is_empty and a.status == SequenceStatus.WAITING


def test_bad_config():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, BS)


def test_a_prompt_waits_one_step_for_the_prefix_another_prompt_is_computing():
    bm = BlockManager(32, BS)
    sched = Scheduler(SchedulerConfig(), bm)
    shared = list(range(12))  # three full blocks
    a, b, c = seq("a", shared + [90, 91]), seq("b", shared + [80, 81]), seq("c", [70] * 9)
    for s in (a, b, c):
        sched.add(s)
    first = step(sched)
    assert [s.seq.request_id for s in first.seqs] == ["a", "c"]  # b would have computed a's blocks again
    assert list(sched.waiting) == [b]
    second = step(sched)
    assert [(s.seq.request_id, s.num_new) for s in second.seqs if s.seq is b] == [("b", 2)]
    assert b.num_cached_tokens == 12 and sched.prefix_hit_tokens == 12


def test_a_chunked_prompt_holds_back_only_what_shares_its_uncommitted_blocks():
    bm = BlockManager(32, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), bm)
    a, b = seq("a", list(range(16)) + [99]), seq("b", list(range(16)) + [98])
    sched.add(a)
    sched.add(b)
    step(sched)  # a's first 8 tokens (2 blocks committed after the step); b waits for block 3
    assert a.num_computed == 8 and list(sched.waiting) == [b]
    step(sched)  # a computes 8 more, b still waits: blocks 3-4 are a's, uncommitted at scheduling
    step(sched)
    assert b.num_cached_tokens == 16 and b.status == SequenceStatus.RUNNING
