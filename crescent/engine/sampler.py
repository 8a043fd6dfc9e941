"""Token choice for a batch of last-position logits: penalties and logit_bias, grammar masks (structured outputs),
then greedy or temperature, top-k, top-p, seeds; and logprobs (of the model's own distribution).

Sampling draws ``argmax(p / E)`` with ``E ~ Exponential(1)`` i.i.d. per vocabulary entry (the Gumbel-max trick
in another form: it picks token i with probability p_i). For a seeded request the noise of output index i comes from
a CPU generator seeded by (seed, i), so the token does not depend on the batch, the device, or on which worker
(prefill or decode) produced it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crescent.engine.sampling_params import SamplingParams
from crescent.engine.structured import apply_grammars

Logprob = tuple[int, float, list[tuple[int, float]]]  # (token id, logprob, top-N [(id, logprob)])


@dataclass
class SampleRequest:
    params: SamplingParams
    output_index: int
    """Index of the token being drawn among the request's outputs (forced outputs included)."""
    prompt_ids: Sequence[int] = ()
    """The prompt (repetition_penalty counts it); only read when the request has penalties."""
    output_ids: Sequence[int] = ()
    """The outputs so far, forced ones included (all penalties count them)."""
    grammar: Any = None
    """The request's xgrammar GrammarMatcher (structured outputs): only tokens it allows can be drawn."""


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


def _token_counts(rows: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] float counts of each token id per row (ragged rows padded with a dropped column)."""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    if width:
        ids = torch.full((len(rows), width), vocab, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        ids = ids.to(device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, then logit_bias, on the rows that
    ask for them, in one batched pass; the other rows are returned untouched. Runs before temperature, top-k and
    top-p, and for greedy rows too (vLLM's order)."""
    rows = [i for i, r in enumerate(requests) if r.params.has_penalties]
    if not rows:
        return logits
    vocab, dev = logits.shape[-1], logits.device
    reqs = [requests[i].params for i in rows]
    sub = logits[rows]
    out_counts = _token_counts([requests[i].output_ids for i in rows], vocab, dev)
    if any(p.repetition_penalty != 1.0 for p in reqs):
        seen = (_token_counts([requests[i].prompt_ids for i in rows], vocab, dev) + out_counts) > 0
        rep = torch.tensor([p.repetition_penalty for p in reqs], device=dev).unsqueeze(1)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([p.frequency_penalty for p in reqs], device=dev).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in reqs], device=dev).unsqueeze(1)
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    bias = [(j, t, v) for j, p in enumerate(reqs) for t, v in p.logit_bias.items()]
    if bias:
        j, t, v = zip(*bias, strict=True)
        sub = sub.index_put((torch.tensor(j, device=dev), torch.tensor(t, device=dev)),
                            torch.tensor(v, device=dev, dtype=sub.dtype), accumulate=True)
    logits = logits.clone()
    logits[rows] = sub
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
    raw = logits  # logprobs are of the model's distribution, as OpenAI reports them
    logits = apply_grammars(apply_penalties(logits, requests), [r.grammar for r in requests])
    if all(r.params.greedy for r in requests):  # the common serving case: one argmax for the whole batch
        token_ids = torch.argmax(logits, dim=-1).tolist()
    else:
        token_ids = [_sample_row(logits[i], r) for i, r in enumerate(requests)]
    return token_ids, _logprobs(raw, token_ids, requests)
