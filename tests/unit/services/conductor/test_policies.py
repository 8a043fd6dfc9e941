from __future__ import annotations

import dataclasses

import pytest

from crescent.services.conductor.cluster import Placement, Rejection, Role, Tier
from crescent.services.conductor.kv_index import KvIndex
from crescent.services.conductor.ledger import InFlight, Ledger
from crescent.services.conductor.policies import (
    POLICIES,
    cache_aware,
    get_policy,
    least_loaded,
    mooncake,
    round_robin,
)

from .helpers import COST, cache, inst, request, view


def _two_prefill(**busy):
    return [inst("p0", Role.PREFILL, **busy), inst("p1", Role.PREFILL)], [inst("d0", Role.DECODE)]


def test_round_robin_cycles_through_instances():
    p, _ = _two_prefill()
    d = [inst("d0", Role.DECODE), inst("d1", Role.DECODE)]
    picks = [round_robin(view(p, d, seq=s), request(2)) for s in range(4)]
    assert [(x.prefill.instance_id, x.decode.instance_id) for x in picks] == [
        ("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]


def test_least_loaded_takes_the_shortest_queue_and_the_lightest_decode():
    p, _ = _two_prefill(waiting=3, queued_prefill_tokens=3000)
    d = [inst("d0", Role.DECODE, running=40, running_context_tokens=40_000), inst("d1", Role.DECODE, running=2)]
    placed = least_loaded(view(p, d), request(2))
    assert placed.prefill.instance_id == "p1" and placed.decode.instance_id == "d1"
    # TBT the decode instance will see with this request added: 0.01 + 1e-3 * 3 + 1e-5 * prompt (33 tokens).
    assert placed.predicted_tbt_s == pytest.approx(0.01 + 3e-3 + 33e-5)


def test_cache_aware_prefers_the_longest_prefix_and_breaks_ties_by_load():
    index = KvIndex()
    p, d = _two_prefill(waiting=1, queued_prefill_tokens=500)
    cache(index, "p0", 4)
    cache(index, "p1", 2)
    placed = cache_aware(view(p, d, index=index), request(4, prompt=100))
    assert placed.prefill.instance_id == "p0" and placed.cached_blocks == 4
    cache(index, "p1", 4)  # now a tie: the idle one wins
    assert cache_aware(view(p, d, index=index), request(4, prompt=100)).prefill.instance_id == "p1"


def test_mooncake_trades_a_cache_hit_for_a_shorter_queue():
    index = KvIndex()
    p, d = _two_prefill(waiting=2, queued_prefill_tokens=2000)  # p0: 2 s of queued prefill
    cache(index, "p0", 10)
    req = request(10)  # 161 tokens: 0.161 s to compute from scratch on the idle p1
    assert cache_aware(view(p, d, index=index), req).prefill.instance_id == "p0"
    placed = mooncake(view(p, d, index=index), req)
    assert placed.prefill.instance_id == "p1" and placed.cached_blocks == 0
    assert placed.predicted_ttft_s == pytest.approx(0.161)


def test_mooncake_reads_the_store_dram_tier_when_it_beats_recomputing():
    index = KvIndex()
    p, d = _two_prefill()
    store = [inst("s0", Role.KVSTORE)]
    cache(index, "s0", 10, Tier.DRAM)  # 160 tokens at 0.1 ms each = 16 ms vs 160 ms to recompute
    placed = mooncake(view(p, d, kvstore=store, index=index), request(10))
    assert placed.cached_blocks == 10 and placed.prefix_source == "s0" and placed.prefix_tier == Tier.DRAM
    assert placed.kvstore.instance_id == "s0"
    assert placed.predicted_ttft_s == pytest.approx(0.016 + 0.001)


def test_a_slow_ssd_copy_is_recomputed_instead():
    index = KvIndex()
    p, d = _two_prefill()
    slow = dataclasses.replace(COST, bandwidth_bps={"DEVICE": 1e6, "DRAM": 1e7, "SSD": 1e5})
    cache(index, "s0", 10, Tier.SSD)
    v = view(p, d, kvstore=[inst("s0", Role.KVSTORE)], index=index)
    v.cost = slow
    placed = mooncake(v, request(10))
    assert placed.cached_blocks == 0 and placed.predicted_ttft_s == pytest.approx(0.161)


def test_mooncake_replicates_a_hot_prefix_from_a_busy_holder():
    index = KvIndex()
    p, d = _two_prefill(waiting=5, queued_prefill_tokens=5000)
    cache(index, "p0", 10)
    v = view(p, d, index=index)
    v.cost = dataclasses.replace(COST, bandwidth_bps={"DEVICE": 1e8, "DRAM": 1e7, "SSD": 1e6})
    placed = mooncake(v, request(10))
    assert placed.prefill.instance_id == "p1"
    assert (placed.replicate_from, placed.replicate_blocks, placed.cached_blocks) == ("p0", 10, 10)
    assert placed.predicted_ttft_s == pytest.approx(160 * 1000 / 1e8 + 0.001)


def test_decode_needs_room_for_the_request():
    p, _ = _two_prefill()
    d = [inst("d0", Role.DECODE, free_kv_blocks=1, total_kv_blocks=100),
         inst("d1", Role.DECODE, running=30, free_kv_blocks=50, total_kv_blocks=100)]
    for policy in (least_loaded, cache_aware, mooncake):
        assert policy(view(p, d), request(2)).decode.instance_id == "d1"


def test_at_least_one_prompt_token_is_computed():
    index = KvIndex()
    p, d = _two_prefill()
    cache(index, "p0", 4)
    cache(index, "p1", 4)
    placed = mooncake(view(p, d, index=index), request(4, prompt=64))  # 64 tokens = exactly 4 full blocks
    assert placed.cached_blocks == 3


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_rejects_an_empty_cluster(name):
    assert get_policy(name)(view([], [inst("d0", Role.DECODE)]), request(1)) == Rejection("no_instance", 1.0)
    assert isinstance(get_policy(name)(view(*_two_prefill()), request(1)), Placement)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy 'best'"):
        get_policy("best")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_keeps_both_halves_on_an_aggregated_worker(name):
    workers = [inst("w0", Role.WORKER), inst("w1", Role.WORKER)]
    for seq in range(4):
        got = POLICIES[name](view(workers, workers, seq=seq), request(2))
        assert got.decode is got.prefill, (seq, got.prefill.instance_id, got.decode.instance_id)


def test_decode_follows_an_aggregated_prefill_even_where_another_worker_decodes_faster():
    workers = [inst("w0", Role.WORKER, running=40, running_context_tokens=40_000),
               inst("w1", Role.WORKER, waiting=3, queued_prefill_tokens=3000)]
    got = least_loaded(view(workers, list(workers)), request(2))
    assert (got.prefill.instance_id, got.decode.instance_id) == ("w0", "w0")
    assert got.predicted_tbt_s > least_loaded(view(workers[1:], workers[1:]), request(2)).predicted_tbt_s


def test_a_disaggregated_prefill_may_still_pair_with_any_decode():
    p, d = [inst("p0", Role.PREFILL)], [inst("w0", Role.WORKER)]
    got = least_loaded(view(p, d), request(2))
    assert (got.prefill.instance_id, got.decode.instance_id) == ("p0", "w0")


@pytest.mark.parametrize("policy", [cache_aware, mooncake])
def test_a_prefix_queued_on_an_instance_counts_as_cached_there_and_is_not_fetched_from_it(policy):
    # p0 has a request computing a 10-block prefix queued; the index does not list those blocks yet
    p, d = _two_prefill(waiting=0)
    ledger = Ledger()
    ledger.add(InFlight("first", "p0", "d0", 161, 161, 32, placed_at=0.0, decode_start=0.2,
                        block_hashes=tuple(range(1000, 1010))))
    placed = policy(view(p, d, ledger=ledger), request(10, rid="second"))
    assert placed.prefill.instance_id == "p0" and placed.cached_blocks == 10
    assert placed.prefix_source == "p0" and placed.replicate_blocks == 0
