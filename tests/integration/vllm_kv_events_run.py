"""vLLM with crescent's engine arguments and KV events on, for tests/integration/test_vllm_kv_events.py; run with
.venv-vllm's python.

    PYTHONPATH=<repo> .venv-vllm/bin/python tests/integration/vllm_kv_events_run.py SPEC.json OUT.json

SPEC: {"model", "pages" (vLLM's KV cache size in pages of 32 tokens: small, so the prompts evict each other),
"prompts": [[token ids], ...]}. Each prompt runs on its own (one greedy token); KvEventRelay (the worker's relay)
collects what vLLM published meanwhile. OUT: {"events": [[kind, [crescent block hashes]], ...] in arrival order,
"after": [index of the last event seen after each prompt]}. The engine core runs in this process (no spawn), but
vLLM still wants the ``__main__`` guard.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "vllm"))
import launcher  # noqa: E402,F401


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig

    from crescent.engine.settings import VllmEngineSettings
    from crescent.engine.vllm_engine import engine_args
    from crescent.services.worker.vllm_kv_events import KvEventRelay, VllmBlockMap

    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    endpoint = f"ipc://{tempfile.mkdtemp()}/events"
    settings = VllmEngineSettings(dtype="float32", kv_block_size=16, max_model_len=1024, vllm_enforce_eager=True)
    args = engine_args(settings, spec["model"], "m", None, True, endpoint)
    args["kv_events_config"] = KVEventsConfig(**args["kv_events_config"])
    args["num_gpu_blocks_override"] = spec["pages"]
    events: list[tuple[str, list[int]]] = []
    lock = threading.Lock()

    def sink(kind: str, hashes: list[int]) -> None:
        with lock:
            events.append((kind, hashes))

    relay = KvEventRelay(endpoint, VllmBlockMap("m", 16, args["block_size"]), sink)
    llm = LLM(distributed_executor_backend="uni", **args)
    after = []
    for prompt in spec["prompts"]:
        seen = relay.batches
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        deadline = time.monotonic() + 10  # the publisher's thread sends after the step
        while relay.batches == seen and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        with lock:
            after.append(len(events))
    relay.close()
    Path(out_path).write_text(json.dumps({"events": events, "after": after}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
