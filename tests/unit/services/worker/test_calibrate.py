"""Calibration against the real LLMEngine (a tiny random model on CPU): the profile runs and the fit is usable."""

from __future__ import annotations

from crescent.engine.model_runner import kv_block_bytes
from crescent.services.conductor.calibrate import calibrate
from crescent.services.worker.calibrate import EngineProfile, busy_reason
from tests.unit.engine.helpers import make_engine, tiny_model


def test_calibrate_times_the_real_engine(tmp_path):
    engine = make_engine(tiny_model(), num_kv_blocks=256)
    model = calibrate(lambda: EngineProfile(engine, decode_steps=2), prefill_points=[(8, 0), (24, 0), (48, 0), (16, 16)],
                      decode_points=[(1, 8), (2, 8), (4, 8), (2, 24)], repeats=1, source="test")
    dtype = next(engine.model.parameters()).dtype
    assert model.kv_bytes_per_token == kv_block_bytes(engine.config, 4, dtype) // 4
    assert model.prefill_time(64) > 0 and model.decode_step_time(4, 64) > 0
    assert all(c >= 0 for c in (*model.prefill_s, *model.decode_step_s))
    assert not engine.has_unfinished_requests()  # the profile cleans up after itself


def test_a_calibration_on_a_busy_machine_is_not_cached():
    assert busy_reason(1.2, 2) == "" and busy_reason(3.0, 2) == ""
    assert busy_reason(3.1, 2) == "load average 3.1 on 2 cores"
    assert busy_reason(17.0, 16) == ""
