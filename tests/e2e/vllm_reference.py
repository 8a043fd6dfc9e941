"""Greedy outputs of ``vllm.LLM.generate`` on given token ids: the reference the vLLM e2e tests compare against.

    .venv-vllm/bin/python tests/e2e/vllm_reference.py IN.json OUT.json

IN.json: {"model": folder, "engine": {vLLM engine args}, "prompts": [[token ids], ...], "max_tokens": N}.
OUT.json: {"outputs": [{"token_ids": [...], "text": "..."}], "load_s": seconds to build the engine}.
Imports only vLLM and the standard library; vLLM's engine core starts with spawn, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: a faster start
    started = time.perf_counter()
    llm = LLM(model=spec["model"], seed=0, distributed_executor_backend="uni", **spec["engine"])
    load_s = time.perf_counter() - started
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    result = {"load_s": load_s,
              "outputs": [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outs]}
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
