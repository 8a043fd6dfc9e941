"""crescent's request parameters and outputs in vLLM's terms (pure functions: no vLLM import, unit-tested in .venv).

``sampling_kwargs`` gives the keyword arguments of ``vllm.SamplingParams`` for one of crescent's
:class:`SamplingParams`; ``logprobs_from_vllm`` turns vLLM's per-position logprob dicts into crescent's
``(token id, logprob, top-N [(id, logprob)])``.

What does not map one to one, and why it is acceptable:
- Outputs generated elsewhere (prefill's first token, a resumed stream's ``prior_outputs``) reach vLLM as part of
  the prompt: its presence/frequency penalties then do not count them (repetition_penalty does, it reads prompt
  and output), and a seeded request draws a different sequence than crescent's engine would.
- ``response_format`` is refused: vLLM's grammar would start after the forced first token, which every served
  request has (the gateway splits each request into prefill's first token and decode's rest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from crescent.engine.sampler import Logprob
from crescent.engine.sampling_params import SamplingParams


def sampling_kwargs(params: SamplingParams, num_forced: int = 0) -> dict[str, Any]:
    """``vllm.SamplingParams(**kwargs)`` for ``params``, for a request whose first ``num_forced`` outputs were
    generated elsewhere and are appended to its prompt (they count against max_tokens and min_tokens)."""
    if params.response_format:
        raise ValueError("response_format is not supported by the vLLM engine (its grammar cannot start after "
                         "prefill's first token); serve with engine=crescent for structured outputs")
    remaining = params.max_tokens - num_forced
    if remaining < 1:
        raise ValueError(f"max_tokens={params.max_tokens} leaves nothing to generate after {num_forced} forced "
                         "output tokens")
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else 0,  # vLLM's "all tokens" is 0
        "seed": params.seed,
        "max_tokens": remaining,
        "min_tokens": max(0, params.min_tokens - num_forced),
        "stop": list(params.stop) or None,
        "stop_token_ids": list(params.stop_token_ids) or None,
        "ignore_eos": params.ignore_eos,
        "logprobs": params.logprobs,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "logit_bias": dict(params.logit_bias) or None,
        "skip_special_tokens": True,  # crescent's detokenizer returns no text for EOS/special tokens either
    }


def logprobs_from_vllm(token_ids: Sequence[int], positions: Sequence[Mapping[int, Any]] | None,
                       top_n: int) -> list[Logprob]:
    """crescent's logprobs for ``token_ids`` from vLLM's per-position ``{token id: Logprob(logprob, rank)}``: the
    sampled token's logprob and the ``top_n`` best by rank. A position vLLM did not report gets NaN."""
    out: list[Logprob] = []
    positions = list(positions or [])
    for i, token in enumerate(token_ids):
        entries = positions[i] if i < len(positions) else {}
        sampled = entries.get(token)
        ranked = sorted(((lp.rank if lp.rank is not None else math.inf, tid, lp.logprob)
                         for tid, lp in entries.items()), key=lambda e: e[0])
        top = [(tid, float(lp)) for _, tid, lp in ranked[:top_n]]
        out.append((token, float(sampled.logprob) if sampled is not None else math.nan, top))
    return out
