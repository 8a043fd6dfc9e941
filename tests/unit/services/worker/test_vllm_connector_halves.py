"""CrescentConnector's two halves without vLLM: the scheduler half's lookups, load/save orders and reports, and the
worker half's page mapping, saves and loads, against a real kvstore on loopback (vLLM's objects are stood in for by
plain namespaces holding the fields the halves read; the end-to-end test with vLLM is
tests/integration/test_vllm_connector.py).

The fake page layout is the CPU backend's AVX2 (``vec``) one, measured there: values ``[heads, page, dim]`` and keys
transposed ``[heads, dim, page]`` inside each page.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crescent.hashing import prefix_block_hashes
from crescent.services.kvstore.server import run_in_thread
from crescent.services.kvstore.settings import KvStoreSettings
from crescent.services.worker.vllm_connector_plan import (
    ConnectorConfig,
    RequestPlan,
    TransferParams,
    loadable_tokens,
    slots_for,
    sum_reports,
)
from crescent.services.worker.vllm_connector_scheduler import ConnectorScheduler
from crescent.services.worker.vllm_connector_worker import ConnectorWorker
from crescent.services.worker.vllm_kv_layout import (
    from_store_blocks,
    gather_tokens,
    probe_page_layout,
    scatter_tokens,
    to_store_blocks,
)

TOKEN = "halves-token"
LAYERS, HEADS, PAGE, DIM, BS = 3, 2, 32, 8, 4
MODEL = "m"


def vec_write(key, value, page, slots):
    """The AVX2 kernel's order, written in torch: keys [H, D, page], values [H, page, D] per page."""
    pages, heads, page_size, two_d = page.shape
    body = page.view(pages, heads, 2, page_size * (two_d // 2))
    for i, s in enumerate(slots.tolist()):
        p, t = divmod(s, page_size)
        body[p, :, 0].view(heads, two_d // 2, page_size)[:, :, t] = key[i]
        body[p, :, 1].view(heads, page_size, two_d // 2)[:, t] = value[i]


def start_store(tmp_path, transport: str = "tcp"):
    return run_in_thread(KvStoreSettings(port=0, data_port=0, metrics_port=0, dram_capacity_bytes=4 << 20,
                                         ssd_capacity_bytes=0, data_dir=str(tmp_path), dram_prefault=False,
                                         internal_token=TOKEN, transport=transport))


@pytest.fixture
def store(tmp_path):
    handle = start_store(tmp_path)
    yield handle
    handle.stop()


@pytest.fixture(params=["tcp", "mooncake"])
def any_store(request, tmp_path):
    if request.param == "mooncake":
        pytest.importorskip("mooncake.engine")
    handle = start_store(tmp_path, request.param)
    handle.transport = request.param
    yield handle
    handle.stop()


def config(**kw) -> ConnectorConfig:
    return ConnectorConfig(internal_token=TOKEN, timeout_s=5.0, block_size=BS, **kw)


def request(rid: str, prompt: list[int], store, load: bool, save: bool):
    params = {"kvstore_address": store.data_address, "kvstore_transport": getattr(store, "transport", "tcp"),
              "model_id": MODEL,
              "load": load, "save": save}
    return SimpleNamespace(request_id=rid, prompt_token_ids=prompt, kv_transfer_params=params)


def step(new=(), cached=(), scheduled=None):
    """A SchedulerOutput with the fields the scheduler half reads."""
    ids = [c[0] for c in cached]
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=n) for r, b, n in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=ids, resumed_req_ids=set(),
                                              new_block_ids=[(c[1],) for c in cached],
                                              num_computed_tokens=[c[2] for c in cached]),
        num_scheduled_tokens=scheduled or {})


def worker_with_caches(num_pages: int = 8) -> tuple[ConnectorWorker, list[torch.Tensor]]:
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(num_pages, HEADS, PAGE, 2 * DIM)
              for i in range(LAYERS)}
    worker = ConnectorWorker(config(), report_events=False)
    worker.register_kv_caches(caches, probe_page_layout(vec_write, HEADS, PAGE, DIM, torch.float32))
    return worker, [caches[f"model.layers.{i}.self_attn.attn"] for i in range(LAYERS)]


def fill(layers: list[torch.Tensor], slots: list[int], seed: int) -> torch.Tensor:
    """Write random KV for ``slots`` as the kernel would; returns it as [L, n, 2, H, D]."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYERS, len(slots), 2, HEADS, DIM, generator=gen)
    for layer, layer_kv in zip(layers, kv, strict=True):
        vec_write(layer_kv[:, 0], layer_kv[:, 1], layer, torch.tensor(slots))
    return kv


def test_params_and_config_are_checked():
    assert not TransferParams.parse(None).active
    assert TransferParams.parse({"kvstore_address": "h:1", "load": True, "other_connector": 1}).active
    for bad, why in [({"load": "yes"}, "must be a bool"), ({"kvstore_transport": "udp"}, "one of"),
                     ({"kvstore_address": "nohost"}, "host:port"), ([], "must be a dict")]:
        with pytest.raises(ValueError, match=why):
            TransferParams.parse(bad)
    with pytest.raises(ValueError, match="unknown kv_connector_extra_config keys"):
        ConnectorConfig.from_extra({"block_size": 16, "blok": 1})
    with pytest.raises(ValueError, match="instance_id"):
        ConnectorConfig.from_extra({"conductor_address": "h:1"})


def test_plan_arithmetic():
    assert loadable_tokens(300, 18, 16) == 288 and loadable_tokens(320, 20, 16) == 304  # never the last token
    assert loadable_tokens(300, 5, 16) == 80 and loadable_tokens(1, 3, 16) == 0
    assert slots_for([7, 2], 4, 2, 6) == [30, 31, 8, 9]
    plan = RequestPlan(TransferParams(), list(range(5)), 22, 4, stored_blocks=2)
    assert plan.ready_to_save(9) == (2, 2) and plan.ready_to_save(30) == (2, 5)


def test_page_layout_round_trip_and_store_block_format():
    worker, layers = worker_with_caches()
    slots = [3, 40, 41, 200, 255, 0]
    kv = fill(layers, slots, seed=1)
    got = gather_tokens(layers, worker.layout, torch.tensor(slots))
    assert torch.equal(got, kv)
    fresh = [torch.zeros_like(layer) for layer in layers]
    scatter_tokens(fresh, worker.layout, torch.tensor(slots), kv)
    assert all(torch.equal(a, b) for a, b in zip(fresh, layers, strict=True))
    blocks = to_store_blocks(kv[:, :4], 2)  # crescent's engine block: [L, 2, bs, H, D]
    assert blocks.shape == (2, LAYERS, 2, 2, HEADS, DIM) and torch.equal(blocks[1, :, 0, 1], kv[:, 3, 0])
    assert torch.equal(from_store_blocks(blocks), kv[:, :4])


def test_save_then_load_in_another_worker(any_store):
    """Producer: a 22-token prompt in pages [5, 1] saved in two chunks; consumer: pages [2, 6] load 20 tokens."""
    prompt = list(range(100, 122))
    sched = ConnectorScheduler(config(), PAGE)
    producer, p_layers = worker_with_caches()
    req = request("a", prompt, any_store, load=True, save=True)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # empty store
    sched.update_state_after_alloc(req, [5], 0)
    pages = [5, 1]
    kv = fill(p_layers, slots_for(pages, PAGE, 0, 22), seed=2)
    loads, saves = sched.build_orders(step(new=[("a", [5], 0)], scheduled={"a": 10}))
    assert loads == [] and [len(s.hashes) for s in saves] == [2]  # blocks 0-1 complete after 10 tokens
    producer.save(saves)
    loads, saves = sched.build_orders(step(cached=[("a", [1], 10)], scheduled={"a": 12}))
    assert [len(s.hashes) for s in saves] == [3]  # blocks 2-4; tokens 20-21 are a partial block
    producer.save(saves)
    sched.worker_results(producer.take_results())
    report = sched.request_finished(req)
    assert report == {"loaded_tokens": 0, "stored_blocks": 5, "store_hit_blocks": 0,
                      "block_hashes": prefix_block_hashes(prompt, BS, MODEL)}
    assert sched.counters.values["lookup_misses"] == 1 and producer.counters.values["stored_blocks"] == 5

    consumer, c_layers = worker_with_caches()
    req = request("b", prompt, any_store, load=True, save=True)
    assert sched.get_num_new_matched_tokens(req, 0) == (20, False)
    sched.update_state_after_alloc(req, [2, 6], 20)
    loads, saves = sched.build_orders(step(new=[("b", [2, 6], 20)], scheduled={"b": 2}))
    assert saves == [] and len(loads) == 1  # all 5 blocks were in the store already
    consumer.load(loads)
    assert torch.equal(gather_tokens(c_layers, consumer.layout, torch.tensor(slots_for([2, 6], PAGE, 0, 20))),
                       kv[:, :20])
    assert consumer.take_failed_block_ids() == set() and consumer.counters.values["loaded_tokens"] == 20
    sched.worker_results(consumer.take_results())
    report = sched.request_finished(req)
    assert report["loaded_tokens"] == 20 and report["stored_blocks"] == 0 and report["store_hit_blocks"] == 5
    assert sum_reports([report, None]) == {"requests": 1, "loaded_tokens": 20, "stored_blocks": 0,
                                           "load_hits": 1, "errors": 0}
    for half in (sched, producer, consumer):
        half.close()


def test_local_prefix_hit_loads_only_the_rest(store):
    """vLLM's own cache holds the first 8 tokens: only positions 8..19 are written, from the store's blocks 2-4."""
    prompt = list(range(7, 40))
    sched = ConnectorScheduler(config(), PAGE)
    producer, p_layers = worker_with_caches()
    kv = fill(p_layers, slots_for([0, 1], PAGE, 0, 33), seed=3)
    req = request("a", prompt, store, load=False, save=True)
    sched.get_num_new_matched_tokens(req, 0)
    _, saves = sched.build_orders(step(new=[("a", [0, 1], 0)], scheduled={"a": 33}))
    producer.save(saves)
    consumer, c_layers = worker_with_caches()
    req = request("b", prompt[:21], store, load=True, save=False)
    assert sched.get_num_new_matched_tokens(req, 8) == (12, False)  # 20 loadable, 8 local
    sched.update_state_after_alloc(req, [3], 12)
    loads, _ = sched.build_orders(step(new=[("b", [3], 20)], scheduled={"b": 1}))
    (order,) = loads
    assert order.skip == 0 and len(order.hashes) == 3 and order.slots == slots_for([3], PAGE, 8, 20)
    consumer.load(loads)
    assert torch.equal(gather_tokens(c_layers, consumer.layout, torch.tensor(order.slots)), kv[:, 8:20])
    untouched = gather_tokens(c_layers, consumer.layout, torch.tensor(slots_for([3], PAGE, 0, 8)))
    assert not untouched.any()  # the local prefix's slots were left alone


def test_failures_are_reported_not_raised(store, tmp_path):
    sched = ConnectorScheduler(config(), PAGE)
    bad = SimpleNamespace(request_id="x", prompt_token_ids=[1] * 40, kv_transfer_params={"load": 3})
    assert sched.get_num_new_matched_tokens(bad, 0) == (0, False)
    assert "must be a bool" in sched.request_finished(bad)["error"]
    gone = SimpleNamespace(request_id="y", prompt_token_ids=[1] * 40, kv_transfer_params={
        "kvstore_address": "127.0.0.1:1", "model_id": MODEL, "load": True})
    assert sched.get_num_new_matched_tokens(gone, 0) == (0, False)
    sched.update_state_after_alloc(gone, [], 0)
    assert "lookup at 127.0.0.1:1 failed" in sched.request_finished(gone)["error"]
    assert sched.counters.values["lookup_errors"] == 1
    # the store lost the blocks between lookup and load: the worker names the pages vLLM must recompute
    consumer, _ = worker_with_caches()
    sched2 = ConnectorScheduler(config(), PAGE)
    req = request("z", list(range(50, 70)), store, load=True, save=False)
    sched2.plans["z"] = RequestPlan(TransferParams.parse(req.kv_transfer_params),
                                    prefix_block_hashes(req.prompt_token_ids, BS, MODEL), 20, BS, stored_blocks=4)
    sched2.plans["z"].local_tokens = 0
    sched2.update_state_after_alloc(req, [4], 16)
    loads, _ = sched2.build_orders(step(new=[("z", [4], 16)], scheduled={"z": 4}))
    consumer.load(loads)
    assert consumer.take_failed_block_ids() == {4} and consumer.counters.values["load_errors"] == 1
    sched2.worker_results(consumer.take_results())
    report = sched2.request_finished(req)
    assert report["loaded_tokens"] == 0 and "held 0 of 16 tokens" in report["error"]
    for half in (sched, sched2, consumer):
        half.close()


def test_probe_reads_the_same_order_in_bf16_and_refuses_a_kernel_that_drops_elements():
    fp32 = probe_page_layout(vec_write, HEADS, PAGE, DIM, torch.float32)
    bf16 = probe_page_layout(vec_write, HEADS, PAGE, DIM, torch.bfloat16)  # digits 1..256 are exact in bf16
    assert torch.equal(fp32.key_pos, bf16.key_pos) and torch.equal(fp32.value_pos, bf16.value_pos)
    assert fp32.key_pos[1, 0, 0] == 1 and fp32.key_pos[0, 0, 1] == PAGE  # keys transposed: dim-major
    assert fp32.value_pos[1, 0, 0] == PAGE * DIM + DIM  # values token-major after the keys

    def lossy(key, value, page, slots):
        vec_write(key[:-1], value[:-1], page, slots[:-1])

    with pytest.raises(ValueError, match="wrote"):
        probe_page_layout(lossy, HEADS, PAGE, DIM, torch.float32)


def test_saves_follow_new_pages_and_a_preemption(store):
    """Chunked prefill appends pages; after a preemption vLLM hands the whole (new) page list."""
    sched = ConnectorScheduler(config(), PAGE)
    req = request("p", list(range(80)), store, load=False, save=True)
    sched.get_num_new_matched_tokens(req, 0)
    _, saves = sched.build_orders(step(new=[("p", [3], 0)], scheduled={"p": 32}))
    assert saves[0].slots == slots_for([3], PAGE, 0, 32)
    _, saves = sched.build_orders(step(cached=[("p", [7], 32)], scheduled={"p": 20}))
    assert saves[0].slots == slots_for([3, 7], PAGE, 32, 52) and len(saves[0].hashes) == 5
    out = step(cached=[("p", [1, 2, 4], 0)], scheduled={"p": 80})
    out.scheduled_cached_reqs.resumed_req_ids = {"p"}
    _, saves = sched.build_orders(out)  # recomputed from 0; blocks 0-12 are saved already, 13-19 now
    assert saves[0].slots == slots_for([1, 2, 4], PAGE, 52, 80)
    assert sched.request_finished(req)["stored_blocks"] == 20
    sched.close()


def test_a_failed_save_is_reported_and_its_blocks_not_claimed(tmp_path):
    doomed = start_store(tmp_path)
    sched = ConnectorScheduler(config(), PAGE)
    producer, layers = worker_with_caches()
    fill(layers, slots_for([0], PAGE, 0, 12), seed=4)
    req = request("s", list(range(12)), doomed, load=False, save=True)
    sched.get_num_new_matched_tokens(req, 0)
    _, saves = sched.build_orders(step(new=[("s", [0], 0)], scheduled={"s": 12}))
    doomed.stop()  # the store dies between the order and the save
    producer.save(saves)
    assert producer.counters.values["save_errors"] == 1 and producer.counters.values["stored_blocks"] == 0
    sched.worker_results(producer.take_results())
    report = sched.request_finished(req)
    assert report["stored_blocks"] == 0 and report["block_hashes"] == [] and "save to" in report["error"]
    for half in (sched, producer):
        half.close()
