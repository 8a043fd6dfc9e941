"""vLLM with crescent's engine arguments and KV events on, for tests/integration/test_vllm_kv_events.py; run with
.venv-vllm's python.

    PYTHONPATH=<repo> .venv-vllm/bin/python tests/integration/vllm_kv_events_run.py SPEC.json OUT.json

SPEC: {"model", "pages" (vLLM's KV cache size in pages of 32 tokens: small, so the prompts evict each other),
"prompts": [[token ids], ...], "conductor": {"address", "token", "instance_id"}}. Each prompt runs on its own (one
greedy token). The worker's path runs as in a worker process: a ConductorLink registered at the conductor and the
KvEventForwarder (its relay reads vLLM's events; what it hands on is also recorded here). OUT: {"events": [[kind,
[crescent block hashes]], ...] in arrival order, "after": [number of events seen after each prompt],
"cached_prefix_blocks": [per prompt, the blocks the conductor's placement finds on this worker at the end]}. The engine
core runs in this process (no spawn), but vLLM still wants the ``__main__`` guard.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "vllm"))
import launcher  # noqa: E402,F401


async def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig

    from crescent.engine.settings import VllmEngineSettings
    from crescent.engine.vllm_engine import engine_args
    from crescent.proto.v1 import common_pb2, conductor_pb2
    from crescent.services.worker.conductor_link import ConductorLink
    from crescent.services.worker.vllm_kv_events import KvEventForwarder, VllmBlockMap, kv_events_endpoint

    endpoint = kv_events_endpoint(spec["conductor"]["instance_id"])  # the worker's choice of endpoint
    settings = VllmEngineSettings(dtype="float32", kv_block_size=16, max_model_len=1024, vllm_enforce_eager=True)
    args = engine_args(settings, spec["model"], "m", None, True, endpoint)
    args["kv_events_config"] = KVEventsConfig(**args["kv_events_config"])
    args["num_gpu_blocks_override"] = spec["pages"]
    c = spec["conductor"]
    info = conductor_pb2.InstanceInfo(instance_id=c["instance_id"], role=common_pb2.ROLE_WORKER,
                                      address="127.0.0.1:1", model_id="m", kv_block_size=16)

    async def load() -> common_pb2.Load:
        return common_pb2.Load()

    link = ConductorLink(c["address"], info, load, 0.5, internal_token=c["token"])
    await link.start()
    while not link.registered:
        await asyncio.sleep(0.05)
    forwarder = KvEventForwarder(endpoint, VllmBlockMap("m", 16, args["block_size"]), link, "m")
    events: list[tuple[str, list[int]]] = []
    forward = forwarder.relay.sink

    def record(kind: str, hashes: list[int]) -> None:  # the relay's thread
        events.append((kind, hashes))
        forward(kind, hashes)

    forwarder.relay.sink = record
    llm = await asyncio.to_thread(LLM, distributed_executor_backend="uni", **args)
    after = []
    for prompt in spec["prompts"]:
        seen = forwarder.relay.batches
        await asyncio.to_thread(llm.generate, [{"prompt_token_ids": prompt}],
                                SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        deadline = time.monotonic() + 10  # the publisher's thread sends after the step
        while forwarder.relay.batches == seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # later batches of the same prompt, and the forwarder's reports
        after.append(len(events))
    placed = await asyncio.to_thread(cached_prefixes, c, spec["prompts"])
    await forwarder.aclose()
    await link.stop()
    return {"events": events, "after": after, "cached_prefix_blocks": placed}


def cached_prefixes(c: dict, prompts: list[list[int]]) -> list[int]:
    """What the conductor's placement finds of each prompt on this worker (the only one registered)."""
    from crescent.hashing import prefix_block_hashes
    from crescent.proto.v1 import conductor_pb2
    from tests.integration.conductor_client import stub

    channel, client = stub(c["address"], c["token"])
    with channel:
        out = []
        for i, prompt in enumerate(prompts):
            reply = client.Place(conductor_pb2.PlaceRequest(
                request_id=f"probe-{i}", model_id="m", prompt_tokens=len(prompt), max_tokens=1, block_size=16,
                block_hashes=prefix_block_hashes(prompt, 16, "m")), timeout=10)
            assert reply.accepted and reply.prefill.instance_id == c["instance_id"], reply
            out.append(reply.cached_prefix_blocks)
        return out


def main(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
