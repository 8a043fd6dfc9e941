"""Which crescent systems the vs-vLLM benchmark starts, which scenarios each runs, and the goals it is held to.

Engine crescent (`crescent up`, crescent's engine): disagg and agg, each against every goal of the serving issue:
output tok/s >= 1.0x vLLM's, median TTFT <= 1.0x (<= 0.7x on prefix_repetition), median TPOT <= 1.0x.
Engine vllm (`crescent up --engine vllm`, issue #16): agg (one worker) >= 0.95x vLLM's output tok/s; two
aggregated workers (agg-2w) run prefix_repetition only, median TTFT <= 0.7x vLLM's (the store and the conductor's
placement have to pay for themselves); disagg is measured against no ratio goal. Every system: no failed request.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from bench.serving.vllm_bench import Scenario

METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms")
_SHORT = {"output_throughput": "output_tok_s", "median_ttft_ms": "median_ttft", "median_tpot_ms": "median_tpot"}
KINDS = ("random", "prefix")


@dataclass(frozen=True)
class RatioGoal:
    """crescent's median of ``metric`` over vLLM's, ``op`` ``value``, on the scenarios of ``kinds``."""

    metric: str  # one of METRICS
    op: str  # ">=" (higher is better) or "<="
    value: float
    kinds: tuple[str, ...] = KINDS

    @property
    def name(self) -> str:
        return f"{_SHORT[self.metric]}_{'ge' if self.op == '>=' else 'le'}_{self.value}x"

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value


@dataclass(frozen=True)
class System:
    """One `crescent up` deployment the benchmark starts."""

    name: str  # the runs' "system", e.g. crescent-agg, crescent-vllm-agg-2w
    engine: str  # crescent or vllm
    mode: str  # disagg (one prefill + one decode worker) or agg
    workers: int  # aggregated workers (agg); 1 for disagg
    kinds: tuple[str, ...]  # the scenario kinds it runs
    goals: tuple[RatioGoal, ...]


CRESCENT_GOALS = (RatioGoal("output_throughput", ">=", 1.0), RatioGoal("median_ttft_ms", "<=", 1.0, ("random",)),
                  RatioGoal("median_ttft_ms", "<=", 0.7, ("prefix",)), RatioGoal("median_tpot_ms", "<=", 1.0))
VLLM_AGG_GOALS = (RatioGoal("output_throughput", ">=", 0.95),)
VLLM_TWO_WORKER_GOALS = (RatioGoal("median_ttft_ms", "<=", 0.7, ("prefix",)),)
DEFAULT_MODES = {"crescent": "disagg,agg", "vllm": "agg,disagg,agg-2w"}
_MODE = re.compile(r"^(disagg|agg)(?:-(\d+)w)?$")


def system(engine: str, mode_token: str) -> System:
    """The system a ``--modes`` entry names: disagg, agg, or agg-Nw (N aggregated workers)."""
    match = _MODE.match(mode_token)
    if engine not in DEFAULT_MODES or not match or (match[1] == "disagg" and match[2]):
        raise ValueError(f"unknown system {mode_token!r} for engine {engine!r}: use disagg, agg or agg-Nw "
                         "(N aggregated workers) with engine crescent or vllm")
    mode, workers = match[1], int(match[2] or 1)
    if workers < 1:
        raise ValueError(f"{mode_token!r}: at least one worker")
    name = "crescent-" + ("" if engine == "crescent" else "vllm-") + mode_token
    if engine == "crescent":
        return System(name, engine, mode, workers, KINDS, CRESCENT_GOALS)
    if mode == "agg" and workers > 1:  # the two-worker deployment is for the shared-prefix scenario
        return System(name, engine, mode, workers, ("prefix",), VLLM_TWO_WORKER_GOALS)
    return System(name, engine, mode, workers, KINDS, VLLM_AGG_GOALS if mode == "agg" else ())


def systems(engine: str, modes: str) -> list[System]:
    return [system(engine, token.strip()) for token in modes.split(",") if token.strip()]


def median_of(runs: list[dict], system_name: str, scenario: str, key: str) -> float | None:
    values = [r[key] for r in runs if r["system"] == system_name and r["scenario"] == scenario
              and r.get(key) is not None]
    return statistics.median(values) if values else None


def failure_reasons(runs: list[dict]) -> dict[str, int]:
    """The gateway's rejection reasons and non-ok outcomes summed over ``runs`` (see gateway_metrics.py)."""
    total: dict[str, int] = {}
    for run in runs:
        gateway = run.get("gateway") or {}
        counts = {**{f"rejected:{k}": n for k, n in (gateway.get("rejections") or {}).items()},
                  **{k: n for k, n in (gateway.get("outcomes") or {}).items() if not k.endswith("/ok")}}
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def compare(runs: list[dict], todo: list[Scenario], systems_run: list[System]) -> dict:
    """Per system and scenario it ran: medians over repeats, crescent/vLLM ratios, which goals hold, and the
    gateway's reasons for crescent's failed requests."""
    out: dict[str, dict] = {}
    for sys_ in systems_run:
        for sc in (sc for sc in todo if sc.kind in sys_.kinds):
            ours = {k: median_of(runs, sys_.name, sc.name, k) for k in METRICS}
            theirs = {k: median_of(runs, "vllm", sc.name, k) for k in METRICS}
            if None in ours.values() or not all(theirs.values()):
                continue  # a side with no finished run: nothing to compare (its runs say why)
            ratio = {k: ours[k] / theirs[k] for k in METRICS}
            mine = [r for r in runs if r["scenario"] == sc.name and r["system"] == sys_.name]
            failed = sum(r.get("failed") or 0 for r in runs if r["scenario"] == sc.name
                         and r["system"] in (sys_.name, "vllm"))
            goals = {g.name: g.met(ratio[g.metric]) for g in sys_.goals if sc.kind in g.kinds}
            goals["zero_failed"] = failed == 0
            out[f"{sys_.name}/{sc.name}"] = {"crescent": ours, "vllm": theirs, "ratio_vs_vllm": ratio,
                                             "failed_requests": failed, "failure_reasons": failure_reasons(mine),
                                             "goals": goals, "meets_all": all(goals.values())}
    return out
