from __future__ import annotations

import pytest

from crescent.services.conductor.calibrate import calibrate
from crescent.services.conductor.cluster import Tier
from crescent.services.conductor.cost_model import CostModel, fit_decode, fit_prefill
from tests.unit.services.conductor.helpers import SyntheticEngine


def test_calibrate_recovers_the_coefficients_and_round_trips(tmp_path):
    model = calibrate(SyntheticEngine, repeats=3, bandwidth_bps={"SSD": 1e9})
    truth = SyntheticEngine().truth
    for n, c in [(100, 0), (2000, 0), (500, 1500)]:
        assert model.prefill_time(n, c) == pytest.approx(truth.prefill_time(n, c), rel=0.05)
    for b, ctx in [(1, 100), (32, 32 * 600)]:
        assert model.decode_step_time(b, ctx) == pytest.approx(truth.decode_step_time(b, ctx), rel=0.05)
    assert model.kv_bytes_per_token == 4096 and model.bandwidth_bps["SSD"] == 1e9
    assert 1.0 <= model.decode_tail_ratio <= 1.03  # the slowest measured/fitted step, with 1% noise
    path = tmp_path / "cost.json"
    model.save(path)
    assert CostModel.load(path) == model


def test_fit_never_returns_negative_costs():
    # Flat timings: a free fit would give a negative slope somewhere; costs must stay >= 0.
    samples = [(n, 0, 0.05 + (0.001 if n == 64 else 0.0)) for n in (64, 128, 256, 512)]
    assert all(c >= 0 for c in fit_prefill(samples))
    assert all(c >= 0 for c in fit_decode([(b, b * 100, 0.03) for b in (1, 2, 4, 8)]))


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="at least 3"):
        fit_prefill([(1, 0, 0.1)])
    with pytest.raises(ValueError, match="not valid JSON"):
        CostModel.from_json("{oops")
    with pytest.raises(ValueError, match="unknown cost model fields"):
        CostModel.from_json('{"prefil_s": [0, 0, 0]}')
    with pytest.raises(ValueError, match="bandwidth"):
        CostModel(bandwidth_bps={"DEVICE": 1.0, "DRAM": 0.0, "SSD": 1.0})


def test_transfer_time_by_tier():
    m = CostModel(kv_bytes_per_token=1000, bandwidth_bps={"DEVICE": 1e6, "DRAM": 1e7, "SSD": 1e6},
                  transfer_latency_s=0.0)
    assert m.transfer_time(1000, Tier.DRAM) == pytest.approx(0.1)
    assert m.tiers_transfer_time([Tier.DRAM, Tier.SSD], block_size=10) == pytest.approx(0.001 + 0.01)
    assert m.prefill_time(0) == 0.0 and m.decode_step_time(0, 0) == 0.0


def test_decode_fit_can_take_the_context_cost_as_given():
    # Short contexts cannot tell d2 from noise: with it given (KV bytes over measured bandwidth) d0, d1 still fit.
    d0, d1, d2 = 0.02, 5e-4, 1e-5
    samples = [(b, b * ctx, d0 + d1 * b + d2 * b * ctx) for b, ctx in ((1, 16), (4, 16), (16, 16), (4, 128))]
    assert fit_decode(samples, context_s=d2) == pytest.approx((d0, d1, d2), rel=1e-6)
    noisy = [(b, c, t * (1.3 if b == 4 and c == 512 else 1.0)) for b, c, t in samples]
    assert fit_decode(noisy)[2] > 2.5 * d2  # a free fit blames 30% noise at one point on the context term
    assert fit_decode(noisy, context_s=d2)[2] == d2
