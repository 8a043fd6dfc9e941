"""Fit the conductor's cost model from timings of the real engine, and save it where the conductor loads it.

``crescent calibrate --out cost_model.json [--model default --device cuda]`` (crescent.services.worker.calibrate) builds an
``LLMEngine`` and times prefill at several (new, cached) sizes and decode steps at several (batch, context) sizes.
:func:`calibrate` takes any factory of a :class:`ProfileTarget`, so tests use a synthetic one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Protocol

from crescent.services.conductor.cost_model import CostModel, fit_decode, fit_prefill

DEFAULT_PREFILL_POINTS = ((64, 0), (256, 0), (512, 0), (1024, 0), (256, 256), (256, 768), (512, 512))
DEFAULT_DECODE_POINTS = ((1, 128), (4, 128), (8, 128), (16, 128), (8, 512), (16, 512), (4, 1024))
STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


class ProfileTarget(Protocol):
    kv_bytes_per_token: int

    def time_prefill(self, new_tokens: int, cached_tokens: int) -> float: ...

    def time_decode_step(self, batch: int, context_per_seq: int) -> float: ...


def calibrate(factory: Callable[[], ProfileTarget], prefill_points: Sequence[tuple[int, int]] = DEFAULT_PREFILL_POINTS,
              decode_points: Sequence[tuple[int, int]] = DEFAULT_DECODE_POINTS, repeats: int = 3,
              bandwidth_bps: dict[str, float] | None = None, source: str = "calibrated",
              statistic: str = "median") -> CostModel:
    """Median (or min) of ``repeats`` timings per point, then a least-squares fit of each cost curve."""
    return calibrate_with_samples(factory, prefill_points, decode_points, repeats, bandwidth_bps, source,
                                  statistic)[0]


def calibrate_with_samples(factory: Callable[[], ProfileTarget],
                           prefill_points: Sequence[tuple[int, int]] = DEFAULT_PREFILL_POINTS,
                           decode_points: Sequence[tuple[int, int]] = DEFAULT_DECODE_POINTS, repeats: int = 3,
                           bandwidth_bps: dict[str, float] | None = None,
                           source: str = "calibrated",
                           statistic: str = "median",
                           kv_read_bps: float | None = None) -> tuple[CostModel, dict[str, list[dict]]]:
    """:func:`calibrate`, plus every point's measured value beside the fitted one (to judge the fit by).

    ``kv_read_bps``: the memory bandwidth a decode step reads the KV cache at (measured apart): then the cost per
    context token is ``kv_bytes_per_token / kv_read_bps`` instead of fit (see ``fit_decode``).

    ``statistic``: "median" of the repeats, or "min" (best of N): on a machine shared with other jobs, noise only
    ever adds time, so the minimum is the steadiest estimate of the engine's own cost.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    pick = STATISTICS[statistic]
    target = factory()
    target.time_prefill(*prefill_points[0])  # warm-up: first calls pay allocation and compilation
    target.time_decode_step(*decode_points[0])
    # Never means: on a shared machine a few timings land on a descheduled core.
    prefill = [(n, c, pick([target.time_prefill(n, c) for _ in range(repeats)])) for n, c in prefill_points]
    decode = [(b, b * ctx, pick([target.time_decode_step(b, ctx) for _ in range(repeats)])) for b, ctx in decode_points]
    context_s = target.kv_bytes_per_token / kv_read_bps if kv_read_bps else None
    model = CostModel(prefill_s=fit_prefill(prefill), decode_step_s=fit_decode(decode, context_s),
                      kv_bytes_per_token=target.kv_bytes_per_token, source=source)
    if bandwidth_bps:
        model.bandwidth_bps.update(bandwidth_bps)
    samples = {
        "prefill": [{"new": n, "cached": c, "measured_s": round(s, 6), "fitted_s": round(model.prefill_time(n, c), 6)}
                    for n, c, s in prefill],
        "decode": [{"batch": b, "context_tokens": ctx, "measured_s": round(s, 6),
                    "fitted_s": round(model.decode_step_time(b, ctx), 6)} for b, ctx, s in decode]}
    model.decode_tail_ratio = round(max([1.0] + [s / model.decode_step_time(b, ctx) for b, ctx, s in decode
                                                 if model.decode_step_time(b, ctx) > 0]), 4)
    return model, samples


def fit_problems(model: CostModel) -> list[str]:
    """What makes a fit unusable for planning: costs that do not grow with work."""
    problems = []
    if model.prefill_s[1] <= 0:
        problems.append("prefill has no per-token cost (p1 = 0): time more, longer prompts")
    if model.decode_step_s[1] <= 0 and model.decode_step_s[2] <= 0:
        problems.append("a decode step does not grow with batch or context (d1 = d2 = 0): time larger batches")
    return problems
