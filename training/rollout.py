"""Rollouts through crescent's own engine, and the policy's sequence log-probabilities for training.

Each sampling round gets a fresh :class:`LLMEngine` over the live model: the engine shares the model's weights
(no copy), and a fresh engine means its prefix cache never serves KV computed by an older policy.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from crescent.engine.llm_engine import LLMEngine
from crescent.engine.sampling_params import SamplingParams
from crescent.engine.settings import EngineSettings
from crescent.training.tasks import Problem, chat_messages
from crescent.training.tokenizer import IM_END, render_chat, special_id


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    """Generated tokens, ending with the end-of-turn token when the model stopped by itself."""
    text: str
    length: int
    """Response length in tokens, the end-of-turn token not counted."""


def prompt_ids(tok: Tokenizer, problem: Problem) -> list[int]:
    return tok.encode(render_chat(chat_messages(problem, with_answer=False), add_generation_prompt=True)).ids


def sample_seed(*parts: object) -> int:
    """A distinct sampling seed per (run seed, iteration, prompt, sample): the engine seeds by (seed, index)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=7).digest(), "little")


def generate(model: torch.nn.Module, tok: Tokenizer, prompts: list[list[int]], params: list[SamplingParams],
             block_size: int = 16) -> list[Sample]:
    """Run the prompts through a fresh engine and decode the responses."""
    end = special_id(tok, IM_END)
    longest = max(len(p) for p in prompts) + max(p.max_tokens for p in params)
    blocks_per_seq = math.ceil(longest / block_size) + 1
    settings = EngineSettings(model="crescent-training", served_model_name="crescent-training",
                              kv_block_size=block_size, num_kv_blocks=blocks_per_seq * min(len(prompts), 256),
                              max_num_seqs=min(len(prompts), 256), max_model_len=longest + 1,
                              max_num_batched_tokens=max(2048, longest), enable_prefix_caching=True,
                              attention_backend="torch")  # fp32 policy; the Triton kernels target bf16 serving
    was_training = model.training
    model.eval()
    try:
        outputs = LLMEngine(model, None, settings).generate(prompts, params)
    finally:
        model.train(was_training)
    samples = []
    for prompt, out in zip(prompts, outputs, strict=True):
        if out.error:
            raise RuntimeError(f"engine failed a rollout: {out.error}")
        ids = list(out.token_ids)
        if out.finish_reason == "stop" and (not ids or ids[-1] != end):
            ids.append(end)
        body = ids[:-1] if ids and ids[-1] == end else ids
        samples.append(Sample(prompt, ids, tok.decode(body), len(body)))
    return samples


def sequence_logprobs(model: torch.nn.Module, samples: list[Sample], device: str,
                      micro_batch: int = 64) -> torch.Tensor:
    """Sum of log pi(response token | prefix) per sample, [N]; differentiable when grad is enabled."""
    out = []
    for first in range(0, len(samples), micro_batch):
        chunk = samples[first:first + micro_batch]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width - 1)
        for row, (s, seq) in enumerate(zip(chunk, seqs, strict=True)):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, len(s.prompt_ids) - 1:len(seq) - 1] = 1.0  # positions that predict response tokens
        ids, mask = ids.to(device), mask.to(device)
        logits = model.forward_dense(ids[:, :-1]).float()
        token_logp = -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out.append((token_logp * mask).sum(dim=1))
    return torch.cat(out)
