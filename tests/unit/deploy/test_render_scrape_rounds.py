"""render.py on real-shaped scrapes: one round scrapes each target a few ms after the previous one."""

from __future__ import annotations

import pytest

from tests.unit.deploy.scripts import load

render = load("grafana/render")

T0 = 1_700_000_000.0


def staggered_times(rounds: int, targets: int, interval_s: float, stagger_s: float = 0.004) -> list[float]:
    return [T0 + r * interval_s + k * stagger_s for r in range(rounds) for k in range(targets)]


def test_interval_and_round_count_ignore_the_stagger_inside_a_round():
    times = staggered_times(rounds=20, targets=5, interval_s=5.0)
    assert render.scrape_rounds(times) == 20
    assert render.default_rate_window(times) == pytest.approx(20.0)
    at = render.eval_times(times, 20.0)
    # One instant per round after the first rate window (not one per few-ms gap between targets).
    assert len(at) == 16
    assert at[1] - at[0] == pytest.approx(5.0)


def test_a_single_scrape_falls_back_to_defaults():
    assert render.scrape_rounds([T0]) == 1
    assert render.default_rate_window([T0]) == 60.0
    assert render.eval_times([T0], 60.0) == [T0]
