"""Issue #20's goal checks over a trace-suite result, at every overloaded load point, misses listed.

A load point is *overloaded* when even the best policy without early rejection misses an SLO for more than
``OVERLOAD_MISS`` of the requests: below that there is nothing for placement or rejection to win.
Goals (requests within both SLOs = "good"):
- mooncake >= the best other policy at the same rejection mode;
- on long-context traces, mooncake >= 1.2x round_robin at the same rejection mode;
- predicted rejects >= 10% fewer than load (mooncake placement) at equal or better SLO attainment;
- predicted never worse than load: attainment at least load's.
"""

from __future__ import annotations

from bench.serving.sim_run import POLICIES, REJECTIONS

OVERLOAD_MISS = 0.05


def overloaded(grid: dict) -> bool:
    return max(grid[f"{p}/none"]["slo_attainment"] for p in POLICIES) < 1.0 - OVERLOAD_MISS


def _point_checks(grid: dict, long_context: bool) -> dict[str, dict]:
    checks: dict[str, dict] = {}
    for rej in REJECTIONS:
        mc = grid[f"mooncake/{rej}"]["good"]
        others = {p: grid[f"{p}/{rej}"]["good"] for p in POLICIES if p != "mooncake"}
        best = max(others, key=others.__getitem__)
        checks[f"mooncake >= best other ({rej})"] = {
            "met": mc >= others[best], "mooncake": mc, "best_other": best, "best_other_good": others[best],
            "ratio": round(mc / max(others[best], 1), 3)}
        if long_context:
            rr = others["round_robin"]
            checks[f"mooncake >= 1.2x round_robin ({rej})"] = {"met": mc >= 1.2 * rr, "ratio": round(mc / max(rr, 1), 3)}
    pred, load = grid["mooncake/predicted"], grid["mooncake/load"]
    rej_ratio = pred["rejected"] / max(load["rejected"], 1)
    attain = round(pred["slo_attainment"] - load["slo_attainment"], 4)
    checks["predicted rejects >= 10% fewer than load at >= attainment"] = {
        "met": rej_ratio <= 0.9 and attain >= 0, "rejected_ratio": round(rej_ratio, 3), "attainment_diff": attain,
        "rejected": {"predicted": pred["rejected"], "load": load["rejected"]},
        "by_reason": {"predicted": pred["rejected_by_reason"], "load": load["rejected_by_reason"]}}
    checks["predicted attainment >= load"] = {"met": attain >= 0, "attainment_diff": attain}
    return checks


def goal_checks(traces: dict) -> dict:
    """{"points": {trace: {load: {overloaded, checks}}}, "summary": {goal: "met/of overloaded points"},
    "misses": [...]}"""
    points: dict = {}
    tally: dict[str, list[int]] = {}
    misses: list[str] = []
    for name, entry in traces.items():
        points[name] = {}
        for load, grid in entry["loads"].items():
            checks = _point_checks(grid, entry["long_context"])
            over = overloaded(grid)
            points[name][load] = {"overloaded": over, "checks": checks}
            if not over:
                continue
            for goal, c in checks.items():
                key = goal.split(" (")[0]
                met, total = tally.setdefault(key, [0, 0])
                tally[key] = [met + bool(c["met"]), total + 1]
                if not c["met"]:
                    misses.append(f"{name} x{load}: {goal}: " + ", ".join(
                        f"{k}={v}" for k, v in c.items() if k not in ("met", "by_reason")))
    summary = {goal: f"{met}/{total} overloaded points" for goal, (met, total) in tally.items()}
    return {"points": points, "summary": summary, "misses": misses}
