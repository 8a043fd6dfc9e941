"""Token choice for a batch of last-position logits: greedy, temperature, top-k, top-p, seeds and logprobs.

Sampling draws ``argmax(p / E)`` with ``E ~ Exponential(1)`` i.i.d. per vocabulary entry (the Gumbel-max trick
in another form: it picks token i with probability p_i). For a seeded request the noise of output index i comes from
a CPU generator seeded by (seed, i), so the token does not depend on the batch, the device, or on which worker
(prefill or decode) produced it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from crescent.engine.sampling_params import SamplingParams

Logprob = tuple[int, float, list[tuple[int, float]]]  # (token id, logprob, top-N [(id, logprob)])


@dataclass
class SampleRequest:
    params: SamplingParams
    output_index: int
    """Index of the token being drawn among the request's outputs (forced outputs included)."""


def _seeded_generator(seed: int, output_index: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k and outside the top-p nucleus of one row."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly more likely than it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def _sample_row(logits: torch.Tensor, req: SampleRequest) -> int:
    params = req.params
    if params.greedy:
        return int(torch.argmax(logits))
    scaled = _filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = scaled.softmax(-1)
    if params.seed is not None:
        noise = torch.empty(probs.shape, dtype=torch.float32).exponential_(
            generator=_seeded_generator(params.seed, req.output_index))
        noise = noise.to(probs.device)
    else:
        noise = torch.empty_like(probs).exponential_()
    return int(torch.argmax(probs / noise))


def _logprobs(logits: torch.Tensor, token_ids: list[int], requests: list[SampleRequest]) -> list[Logprob | None]:
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    out: list[Logprob | None] = [None] * len(requests)
    if not rows:
        return out
    logp = torch.log_softmax(logits[rows], dim=-1).cpu()  # of the raw logits, as OpenAI reports them
    max_n = max(requests[i].params.logprobs or 0 for i in rows)
    top_vals, top_ids = torch.topk(logp, max_n, dim=-1) if max_n else (None, None)
    for j, i in enumerate(rows):
        n = requests[i].params.logprobs or 0
        top = [(int(top_ids[j, k]), float(top_vals[j, k])) for k in range(n)] if n else []
        out[i] = (token_ids[i], float(logp[j, token_ids[i]]), top)
    return out


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> tuple[list[int], list[Logprob | None]]:
    """``logits`` [N, vocab] fp32, one row per request. Returns the chosen token ids and their logprobs."""
    if logits.shape[0] != len(requests):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(requests)} requests")
    logits = logits.float()
    if all(r.params.greedy for r in requests):  # the common serving case: one argmax for the whole batch
        token_ids = torch.argmax(logits, dim=-1).tolist()
    else:
        token_ids = [_sample_row(logits[i], r) for i, r in enumerate(requests)]
    return token_ids, _logprobs(logits, token_ids, requests)
