"""What a simulator run achieved: goodput, SLO attainment, rejections, wasted prefill, prefix hits, latencies."""

from __future__ import annotations

from collections import Counter

import numpy as np

from bench.serving.sim import RequestRecord, SimConfig
from bench.serving.trace import TraceRequest


def _pct(values: list[float], qs=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": round(float(v), 4) for q, v in zip(qs, np.percentile(values, qs), strict=True)}


def ideal_hit_rate(trace: list[TraceRequest], block_tokens: int = 512) -> float:
    """Prompt tokens reusable with an infinite cache (full blocks seen before) over all prompt tokens."""
    seen: set[int] = set()
    hit = total = 0
    for req in trace:
        blocks = req.full_block_hashes(block_tokens)
        n = 0
        while n < len(blocks) and blocks[n] in seen:
            n += 1
        hit += min(n * block_tokens, req.input_length - 1)
        total += req.input_length
        seen.update(blocks)
    return hit / max(total, 1)


def summarize(records: list[RequestRecord], cfg: SimConfig, span_s: float) -> dict:
    """Good = finished with TTFT <= ttft_slo_s and TBT (mean of the slowest 10% of gaps) <= tbt_slo_s."""
    n = len(records)
    finished = [r for r in records if r.finished]
    good = [r for r in finished if r.ttft_s <= cfg.ttft_slo_s and r.tbt_s <= cfg.tbt_slo_s]
    missed = [r for r in finished if r not in set(good)]
    prefilled = [r for r in records if r.accepted]
    computed = sum(r.computed_tokens for r in prefilled)
    wasted = sum(r.computed_tokens for r in missed)
    return {
        "requests": n,
        "accepted": len(prefilled),
        "rejected": n - len(prefilled),
        "rejected_by_reason": dict(Counter(r.reject_reason for r in records if not r.accepted)),
        "finished": len(finished),
        "good": len(good),
        "goodput_rps": round(len(good) / max(span_s, 1e-9), 4),
        "slo_attainment": round(len(good) / max(n, 1), 4),
        "ttft_attainment_of_finished": round(sum(r.ttft_s <= cfg.ttft_slo_s for r in finished) / max(len(finished), 1), 4),
        "tbt_attainment_of_finished": round(sum(r.tbt_s <= cfg.tbt_slo_s for r in finished) / max(len(finished), 1), 4),
        "prefilled_tokens": computed,
        "wasted_prefill_tokens": wasted,
        "wasted_prefill_requests": len(missed),
        "prefix_hit_rate": round(sum(r.cached_tokens for r in prefilled)
                                 / max(sum(r.prompt_tokens for r in prefilled), 1), 4),
        "ttft_s": _pct([r.ttft_s for r in finished]),
        "tbt_s": _pct([r.tbt_s for r in finished if r.output_tokens > 1]),
    }
