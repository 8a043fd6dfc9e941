"""CrescentConnector end to end: vLLM workers (real processes under .venv-vllm) save a prompt's KV blocks to a real
kvstore and load them back, and the conductor learns where the blocks are.

A producer (prefix caching on, chunked prefill of 128 tokens, so saves happen block by block across steps) saves a
~300-token prompt and reports its blocks to a real conductor; a consumer (a fresh process, prefix caching off, like a
decode worker) runs the same prompt without loading (the reference), then loading (loads 18 blocks, computes the
rest, same greedy tokens), then a second prompt that shares a long prefix (loads that prefix). Both drive vLLM's
LLMEngine with the connector's stat logger, so vLLM's stats path is checked too. Skipped without .venv-vllm
(`make vllm`). Two vLLM start-ups dominate its run time: building the engine took 20 s on a quiet 2-core machine
(plus ~40 s of imports and teardown per process), and 90-210 s while the cores were shared with other jobs, when
the whole test took 7.5-10 minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import common_pb2, conductor_pb2, kvstore_pb2, kvstore_pb2_grpc
from crescent.services.common.auth import sync_channel
from crescent.services.conductor.server import run_in_thread as run_conductor
from crescent.services.conductor.settings import ConductorSettings
from crescent.services.kvstore.server import run_in_thread as run_store
from crescent.services.kvstore.settings import KvStoreSettings
from crescent.services.worker.vllm_connector_plan import sum_reports
from tests.e2e.vllm_helpers import vllm_python_or_skip
from tests.integration.conductor_client import register, stub

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = vllm_python_or_skip()  # CRESCENT_VLLM_PYTHON, else .venv-vllm here (`make vllm`)
DRIVER = Path(__file__).with_name("vllm_connector_run.py")
TOKEN = "vllm-connector-test-token"
BLOCK = 16
MODEL_ID = "SmolLM2-135M-Instruct/vllm-connector-test"

# Two vLLM processes start (imports + engine: ~45 s each on an idle 2-core machine, 3-4 minutes each when the cores
# are shared several ways): the suite-wide 600 s timeout is too tight for that worst case.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father had "
        "taught him, and at the top he trimmed the wick, polished the great lens and watched the ships pass. ")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from crescent.models.registry import resolve_model_path

    return Path(resolve_model_path("default"))


@pytest.fixture(scope="module")
def prompts(model_dir) -> dict[str, list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tok.encode(TEXT * 12).ids
    shared = ids[:250]  # 15 whole blocks of 16 shared by both prompts, then they differ
    a = shared + tok.encode(" The first storm of winter arrived without warning." * 8).ids
    b = shared + tok.encode(" A child asked him why the light never went out." * 3).ids
    return {"a": a[:300], "b": b}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-connector")
    store = run_store(KvStoreSettings(port=0, data_port=0, metrics_port=0, dram_capacity_bytes=96 << 20,
                                      ssd_capacity_bytes=0, data_dir=str(tmp / "ssd"), dram_prefault=False,
                                      ssd_fsync=False, internal_token=TOKEN))
    conductor = run_conductor(ConductorSettings(port=0, metrics_port=0, internal_token=TOKEN, rejection="none"))
    yield store, conductor
    conductor.stop()
    store.stop()


def run_vllm(tmp: Path, name: str, spec: dict) -> dict:
    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}-out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([VLLM_PY, str(DRIVER), str(spec_path), str(out_path)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out_path.read_text())


def store_blocks(store) -> int:
    with sync_channel(store.grpc_address, TOKEN, []) as ch:
        return kvstore_pb2_grpc.KvStoreStub(ch).Stats(kvstore_pb2.StatsRequest(), timeout=5).blocks_dram


def spec(model_dir: Path, store, prompts: dict, runs: list, *, conductor: str = "", instance_id: str = "",
         prefix_caching: bool) -> dict:
    return {"model": str(model_dir), "prefix_caching": prefix_caching, "max_num_batched_tokens": 128,
            "extra_config": {"internal_token": TOKEN, "timeout_s": 10.0, "block_size": BLOCK,
                             "conductor_address": conductor, "instance_id": instance_id},
            "store": {"kvstore_address": store.data_address, "kvstore_transport": "tcp", "model_id": MODEL_ID},
            "prompts": prompts, "runs": runs}


def test_vllm_workers_share_kv_through_the_store(cluster, prompts, model_dir, tmp_path):
    store, conductor = cluster
    a_hashes = prefix_block_hashes(prompts["a"], BLOCK, MODEL_ID)
    b_hashes = prefix_block_hashes(prompts["b"], BLOCK, MODEL_ID)
    shared_blocks = next(i for i, (x, y) in enumerate(zip(a_hashes, b_hashes, strict=False)) if x != y)
    assert len(a_hashes) == 18 and shared_blocks == 15

    # producer: computes prompt a (3 chunks of 128) and saves its 18 full blocks as they complete
    produced = run_vllm(tmp_path, "producer", spec(model_dir, store, prompts, [["a", False, True]],
                                                   conductor=conductor.address, instance_id="vllm-producer",
                                                   prefix_caching=True))
    (p_run,) = produced["runs"]
    assert p_run["report"]["stored_blocks"] == 18 and p_run["report"]["block_hashes"] == a_hashes
    assert p_run["report"]["loaded_tokens"] == 0 and "error" not in p_run["report"]
    assert store_blocks(store) == 18
    assert produced["stats_totals"]["stored_blocks"] == 18 and produced["stats_totals"]["saves"] == 3  # 3 chunks

    # consumer: a fresh process; the reference run computes a, the loading run loads 288 of its 300 tokens
    consumed = run_vllm(tmp_path, "consumer", spec(model_dir, store, prompts, [
        ["a", False, False], ["a", True, False], ["b", False, False], ["b", True, False]], prefix_caching=False))
    ref_a, load_a, ref_b, load_b = consumed["runs"]
    assert ref_a["report"] is None and ref_a["num_cached_tokens"] == 0
    assert load_a["report"]["loaded_tokens"] == 18 * BLOCK and load_a["report"]["store_hit_blocks"] == 18
    assert load_a["num_cached_tokens"] == 18 * BLOCK  # vLLM computed only the last 12 prompt tokens
    assert load_a["tokens"] == ref_a["tokens"] == p_run["tokens"]
    # b shares 15 blocks with a: those are loaded, the rest computed, and the output is the same as computed
    assert load_b["report"]["loaded_tokens"] == shared_blocks * BLOCK
    assert load_b["tokens"] == ref_b["tokens"]
    assert sum_reports([r["report"] for r in consumed["runs"]]) == {
        "requests": 2, "loaded_tokens": 33 * BLOCK, "stored_blocks": 0, "load_hits": 2, "errors": 0}
    assert store_blocks(store) == 18  # nothing saved by the consumer
    stats = consumed["stats_totals"]  # vLLM's stats path: both halves' counters
    assert (stats["lookups"], stats["loads"], stats["loaded_tokens"]) == (2, 2, 33 * BLOCK)
    assert stats.get("lookup_misses", 0) == stats.get("load_errors", 0) == stats.get("saves", 0) == 0

    # the producer's KV events reached the conductor: placement sends b to the worker holding its prefix
    channel, client = stub(conductor.address, TOKEN)
    with channel:
        for iid in ("vllm-producer", "other-worker"):
            register(client, iid, common_pb2.ROLE_WORKER, block_size=BLOCK)
        placed = client.Place(conductor_pb2.PlaceRequest(
            request_id="r1", model_id="m", prompt_tokens=len(prompts["b"]), max_tokens=8, block_hashes=b_hashes,
            block_size=BLOCK), timeout=5)
    assert placed.accepted and placed.prefill.instance_id == "vllm-producer"
    assert placed.cached_prefix_blocks == shared_blocks
    print(f"vLLM start-up: producer {produced['start_s']:.1f}s, consumer {consumed['start_s']:.1f}s; request "
          f"seconds (8 tokens): " + ", ".join(f"{r['name']}{'+load' * r['load']} {r['seconds']:.1f}"
                                             for r in produced["runs"] + consumed["runs"]), file=sys.stderr)
