"""The simulated machines come from the calibration's measurements, not from the planner's fit."""

from __future__ import annotations

import json

import pytest

from bench.serving.sim_hardware import MeasuredHardware, Samples
from bench.serving.trace_suite import PLANNER, SAMPLES
from crescent.services.conductor.cluster import Tier
from crescent.services.conductor.cost_model import CostModel


@pytest.fixture(scope="module")
def planner() -> CostModel:
    return CostModel.load(PLANNER)


@pytest.fixture(scope="module")
def samples() -> Samples:
    return Samples.load(SAMPLES)


def test_samples_carry_the_measured_spread(samples):
    assert len(samples.prefill) == 7 and len(samples.decode) == 8
    assert min(samples.decode_ratios) < 0.7 and max(samples.decode_ratios) > 1.25  # the committed calibration


def test_the_hardware_is_a_refit_not_the_planners_curve(planner, samples):
    hw = MeasuredHardware.from_samples(planner, samples, seed=0, noise=False)
    assert hw.curve.decode_step_s != planner.decode_step_s
    # Within the calibrated range the two stay close (it is a plausible machine), not equal.
    for b, ctx in [(4, 256), (16, 1024)]:
        ratio = hw.decode_step_time(b, ctx) / planner.decode_step_time(b, ctx)
        assert 0.7 < ratio < 1.4 and ratio != pytest.approx(1.0, abs=1e-3)
    assert hw.transfer_time(1000, Tier.DRAM) == planner.transfer_time(1000, Tier.DRAM)


def test_per_operation_noise_is_drawn_from_the_measured_ratios_and_seeded(planner, samples):
    hw = MeasuredHardware.from_samples(planner, samples, seed=3)
    quiet = MeasuredHardware.from_samples(planner, samples, seed=3, noise=False)
    ratios = {round(hw.decode_step_time(8, 512) / quiet.decode_step_time(8, 512), 9) for _ in range(200)}
    assert ratios <= {round(r, 9) for r in samples.decode_ratios} and len(ratios) > 3
    a, b = (MeasuredHardware.from_samples(planner, samples, seed=3) for _ in range(2))
    assert [a.prefill_time(100, 50) for _ in range(20)] == [b.prefill_time(100, 50) for _ in range(20)]


def test_a_file_without_samples_is_refused(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"prefill": [{"new": 1}], "decode": []}))
    with pytest.raises(ValueError, match="not a calibration samples file"):
        Samples.load(bad)
