"""How long things take: prefill, one decode step, moving KV between tiers. Fit from measurements, kept as JSON.

Shapes of the fits (seconds):
- prefill(new, cached) = p0 + p1*new + p2*new*(cached + new/2): a fixed launch cost, per-token linear layers, and
  attention over every (query, key) pair the new tokens see (cached keys, plus half of the new ones: causal);
- decode_step(batch, context) = d0 + d1*batch + d2*context: decode is memory-bound, so a step costs the weights
  (d0), per-sequence work (d1) and reading every cached K/V in the batch (d2 per context token);
- transfer(tokens, tier) = latency + tokens * kv_bytes_per_token / bandwidth(tier).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crescent.services.conductor.cluster import Tier

# SLOs sized from a calibrated model. Mooncake's experiments set the TTFT and TBT thresholds at 10x and 5x of a request
# running alone: a lone prefill of a reference prompt, and a lone decode step at its context. Alone, those refuse a
# burst that the machine serves in the time a user of `vllm serve` waits for it: on 2 cores (one for prefill) 32
# concurrent 256-token prompts take ~24 s to prefill, vLLM's own median TTFT there is ~8 s and its p99 ~14 s, and a
# 10x-lone TTFT SLO (7.8 s) refused 14 of those 32 with 429. So the defaults also admit a reference burst, the load a
# user reasonably sends at once (``SLO_REFERENCE_BURST`` requests of the reference prompt and output, on one prefill
# and one decode instance), with ``SLO_BURST_HEADROOM``; an operator who prefers 429 to waiting sets tighter SLOs.
SLO_REFERENCE_PROMPT_TOKENS = 256
SLO_REFERENCE_BURST = 32
SLO_BURST_HEADROOM = 1.5
# The TBT side needs more: the calibration times a decode step alone, but in `crescent up` the prefill worker shares
# the cores. At concurrency 32 on 2 cores the decode steps ran 1.4-1.7x the fit (median TPOT 0.40-0.48 s against a
# fitted 0.28-0.33 s), and with 1.5x the default refused 6-14 of 32 requests with tbt_slo (bench/results/
# serving_vs_vllm.json, the run at 81e1b31).
SLO_BURST_TBT_HEADROOM = 2.0
# ... and the burst it sizes TBT for decodes at 1K-token contexts, not at the reference prompt's 320: a chat burst
# with a shared 768-token system prompt (vLLM's prefix_repetition, 4x768+64) is ordinary load, and with TBT sized
# at 320 tokens the conductor answered 18-19 of such a 32-request burst with 429 tbt_slo (bench/results/
# serving_vs_vllm.json at 15a23cb), while `vllm serve` served all 32 at a median TPOT of ~0.41 s and crescent's
# admitted ones ran at 0.32-0.48 s, under the 0.71 s SLO.
SLO_REFERENCE_TBT_CONTEXT = 1024
TTFT_SLO_LONE_MULTIPLE = 10.0
TBT_SLO_LONE_MULTIPLE = 5.0
UNCALIBRATED_SLOS = (10.0, 0.2)  # (TTFT, TBT) seconds when the model is the built-in estimate


@dataclass
class CostModel:
    prefill_s: tuple[float, float, float] = (0.02, 1.2e-4, 2.0e-9)  # p0, p1, p2
    decode_step_s: tuple[float, float, float] = (0.025, 1.0e-4, 1.5e-8)  # d0, d1, d2
    kv_bytes_per_token: int = 327_680  # LLaMA2-70B: 80 layers * 8 KV heads * 128 dims * 2 (K, V) * 2 bytes
    # Bytes/s a prefill instance reads KV at, by where it lives. DEVICE means "another worker's cache, over the
    # network"; a worker's own cache costs nothing.
    bandwidth_bps: dict[str, float] = field(default_factory=lambda: {
        "DEVICE": 12.5e9, "DRAM": 12.5e9, "SSD": 3.0e9})
    transfer_latency_s: float = 0.002
    source: str = "default (LLaMA2-70B on 8 GPUs, arithmetic estimate; not measured)"
    # The slowest measured / fitted decode step of the calibration (>= 1; 1 = unknown). The TBT SLO is on a
    # request's slowest gaps (FAST'25: the mean of the slowest 10%), and steps spread around the fit, so early
    # rejection holds the *fitted* step under ``tbt_s / decode_tail_ratio``.
    decode_tail_ratio: float = 1.0

    def __post_init__(self) -> None:
        self.prefill_s = tuple(float(x) for x in self.prefill_s)  # type: ignore[assignment]
        self.decode_step_s = tuple(float(x) for x in self.decode_step_s)  # type: ignore[assignment]
        if len(self.prefill_s) != 3 or len(self.decode_step_s) != 3:
            raise ValueError("prefill_s and decode_step_s need exactly 3 coefficients each")
        if not self.decode_tail_ratio >= 1.0:
            raise ValueError(f"decode_tail_ratio must be >= 1 (the slowest measured/fitted step), got "
                             f"{self.decode_tail_ratio}")
        for tier in ("DEVICE", "DRAM", "SSD"):
            if self.bandwidth_bps.get(tier, 0) <= 0:
                raise ValueError(f"bandwidth_bps[{tier!r}] must be positive")

    @property
    def calibrated(self) -> bool:
        """Fit from timings of a real engine (``crescent calibrate``), not the built-in arithmetic estimate."""
        return self.source.startswith("calibrated")

    def sized_slos(self) -> tuple[float, float]:
        """Default (TTFT, TBT) SLOs in seconds, two significant digits; the built-in estimate's model sizes nothing
        (10 s, 0.2 s). TTFT: the larger of 10x a lone prefill of a 256-token prompt (at least 1 s) and 1.5x the time
        one instance takes to prefill a burst of 32 of them. TBT: the larger of 5x a lone decode step at that
        context (at least 20 ms) and 2x the slowest step of a batch of 32 at 1,024-token contexts (the fit's step
        times ``decode_tail_ratio``, as admission holds it)."""
        if not self.calibrated:
            return UNCALIBRATED_SLOS
        n, burst = SLO_REFERENCE_PROMPT_TOKENS, SLO_REFERENCE_BURST
        ttft = max(1.0, TTFT_SLO_LONE_MULTIPLE * self.prefill_time(n),
                   SLO_BURST_HEADROOM * self.queue_time(burst, burst * n))
        tbt = max(0.02, TBT_SLO_LONE_MULTIPLE * self.decode_step_time(1, n),
                  SLO_BURST_TBT_HEADROOM * self.decode_tail_ratio
                  * self.decode_step_time(burst, burst * SLO_REFERENCE_TBT_CONTEXT))
        return float(f"{ttft:.2g}"), float(f"{tbt:.2g}")

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        p0, p1, p2 = self.prefill_s
        return p0 + p1 * new_tokens + p2 * new_tokens * (cached_tokens + new_tokens / 2)

    def queue_time(self, waiting: int, queued_tokens: int) -> float:
        """Time to drain a prefill queue known only by its request count and token total.

        The attention term assumes equal-length requests (the split is unknown): sum(n_i^2/2) ~ T^2 / (2 w).
        """
        if queued_tokens <= 0:
            return 0.0
        p0, p1, p2 = self.prefill_s
        w = max(waiting, 1)
        return p0 * w + p1 * queued_tokens + p2 * queued_tokens * queued_tokens / (2 * w)

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        d0, d1, d2 = self.decode_step_s
        return d0 + d1 * batch + d2 * context_tokens

    def transfer_time(self, tokens: int, tier: Tier) -> float:
        if tokens <= 0:
            return 0.0
        return self.transfer_latency_s + tokens * self.kv_bytes_per_token / self.bandwidth_bps[tier.name]

    def tiers_transfer_time(self, tiers: list[Tier], block_size: int) -> float:
        """Time to read a prefix whose blocks live in ``tiers`` (one entry per block), each at its tier's rate."""
        if not tiers:
            return 0.0
        seconds = sum(block_size * self.kv_bytes_per_token / self.bandwidth_bps[t.name] for t in tiers)
        return self.transfer_latency_s + seconds

    # -- persistence ---------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"cost model is not valid JSON: {e}") from e
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown cost model fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(Path(path).read_text())


def fit_prefill(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares (non-negative by clipping) fit of p0, p1, p2 from (new, cached, seconds) samples."""
    if len(samples) < 3:
        raise ValueError("need at least 3 prefill samples to fit 3 coefficients")
    a = np.array([[1.0, n, n * (c + n / 2)] for n, c, _ in samples])
    y = np.array([s for _, _, s in samples])
    return _nonneg_lstsq(a, y)


def fit_decode(samples: list[tuple[int, int, float]], context_s: float | None = None) -> tuple[float, float, float]:
    """Fit d0, d1, d2 from (batch, total context tokens, seconds per step) samples.

    ``context_s``: d2 given (e.g. KV bytes per token over the measured memory bandwidth), and only d0, d1 fit.
    Samples with short contexts cannot tell d2 from noise (on a busy CPU a fit once put it 300x above what reading
    the KV costs), and a planner extrapolating that to long contexts refuses everything."""
    if len(samples) < 3:
        raise ValueError("need at least 3 decode samples to fit 3 coefficients")
    a = np.array([[1.0, b, c] for b, c, _ in samples], dtype=float)
    y = np.array([s for _, _, s in samples])
    if context_s is None:
        return _nonneg_lstsq(a, y)
    d0, d1, _ = _nonneg_lstsq(a[:, :2], y - context_s * a[:, 2])
    return d0, d1, float(context_s)


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    # Scale columns so the tiny quadratic coefficient is not lost to conditioning, then refit without any
    # coefficient that came out negative (a negative cost is noise, and would predict negative times).
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    active = list(range(a.shape[1]))
    coef = np.zeros(3)
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active] / scale[active], y, rcond=None)
        sol = sol / scale[active]
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active = [i for i, v in zip(active, sol, strict=True) if v >= 0]
    if not math.isfinite(coef.sum()):
        raise ValueError("cost model fit did not converge")
    return float(coef[0]), float(coef[1]), float(coef[2])
