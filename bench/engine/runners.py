"""The two contenders on the same weights: crescent's LLMEngine and HF transformers ``generate``.

Every function returns measurements only; the caller interleaves them and computes ratios. Each duration is taken
on two clocks: wall time (what a user sees) and this process's CPU time, which a machine shared with other jobs
inflates far less (with one torch thread, CPU time is what the wall time would be on an idle machine).
"""

from __future__ import annotations

import time

import torch

from crescent.engine.llm_engine import LLMEngine
from crescent.engine.sampling_params import SamplingParams


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)


# --- crescent ---------------------------------------------------------------------------------------------------
def crescent_single(engine: LLMEngine, prompt: list[int], new_tokens: int) -> dict:
    """One request alone: time to first token, then the decode rate over the remaining tokens."""
    engine.add_request("single", prompt, greedy(new_tokens))
    t0 = clocks()
    first, tokens = None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            if first is None:
                first = clocks()
    ttft, decode = since(t0), since(first)
    return {"ttft_s": ttft[0] - decode[0], "decode_tok_s": (len(tokens) - 1) / decode[0],
            "decode_tok_s_cpu": (len(tokens) - 1) / decode[1], "tokens": tokens}


def crescent_batch(engine: LLMEngine, prompts: list[list[int]], out_lens: list[int]) -> dict:
    """All requests arrive at once; each one's latency is its own finish time."""
    t0 = clocks()
    for i, (p, n) in enumerate(zip(prompts, out_lens, strict=True)):
        engine.add_request(f"b{i}", p, greedy(n))
    latency: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                latency[out.request_id] = since(t0)[0]
    wall, cpu = since(t0)
    return {"elapsed_s": wall, "cpu_s": cpu, "latencies_s": [latency[f"b{i}"] for i in range(len(prompts))]}


# --- HF transformers ----------------------------------------------------------------------------------------------
def load_hf(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@torch.inference_mode()
def _hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=model.config.eos_token_id)


def hf_single(model, prompt: list[int], new_tokens: int) -> dict:
    """HF has no per-token hook that costs nothing, so the decode rate is (n-1) tokens over t(n) - t(1)."""
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    t0 = clocks()
    _hf_generate(model, ids, mask, 1)
    one = since(t0)
    t1 = clocks()
    out = _hf_generate(model, ids, mask, new_tokens)
    n = since(t1)
    return {"ttft_s": one[0], "decode_tok_s": (new_tokens - 1) / (n[0] - one[0]),
            "decode_tok_s_cpu": (new_tokens - 1) / (n[1] - one[1]), "tokens": out[0, len(prompt):].tolist()}


def hf_batch(model, prompts: list[list[int]], out_lens: list[int]) -> dict:
    """HF's best throughput for a mixed batch: one left-padded generate to the longest output; every request
    finishes when the batch does."""
    width = max(len(p) for p in prompts)
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = clocks()
    _hf_generate(model, ids, mask, max(out_lens))
    wall, cpu = since(t0)
    return {"elapsed_s": wall, "cpu_s": cpu, "latencies_s": [wall] * len(prompts)}


# --- the roofline -------------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of copy bandwidth, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step streams: every matrix once (the embedding table only as the tied head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
