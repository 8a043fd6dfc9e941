"""Pretraining: exact resume (weights, optimizer, RNG, data position) and a falling validation loss."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from crescent.training import checkpoint as ckpt
from crescent.training.pretrain import lr_at, prepare_data, pretrain
from crescent.training.settings import PretrainSettings
from tests.unit.training.helpers import TINY


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["model"]


def test_stop_and_resume_equals_unbroken_run(tmp_path: Path):
    unbroken = pretrain(PretrainSettings(out_dir=tmp_path / "a", **TINY))
    assert unbroken.step == 6
    (tmp_path / "b").mkdir()
    # Same tokenizer and token cache: the resume check is about the training state, not re-tokenizing.
    for name in ("tokenizer", "tokens.pt"):
        src = tmp_path / "a" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / "b" / name)
    first = pretrain(PretrainSettings(out_dir=tmp_path / "b", stop_at=3, **TINY))
    assert first.step == 3 and first.checkpoint.name == "step_000003.pt"
    torch.manual_seed(1234)  # disturb every RNG: the resume must restore them from the checkpoint
    random.seed(99)
    resumed = pretrain(PretrainSettings(out_dir=tmp_path / "b", **TINY))
    assert resumed.step == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))
    state_b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))
    assert torch.equal(state_a["rng"]["torch"], state_b["rng"]["torch"])
    assert [h["val_loss"] for h in state_a["history"]] == [h["val_loss"] for h in state_b["history"]]
    assert state_a["train_loss_ema"] == state_b["train_loss_ema"]
    with pytest.raises(ValueError, match="was prepared with"):  # a cached corpus never silently mismatches
        prepare_data(PretrainSettings(out_dir=tmp_path / "a", **{**TINY, "vocab_size": 500}))


def test_lr_schedule_warms_up_then_decays():
    s = PretrainSettings(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, s) == 0.1 and lr_at(9, s) == 1.0
    assert abs(lr_at(99, s) - 0.1) < 0.01
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 99))


def test_corrupt_checkpoint_gives_clear_error(tmp_path: Path):
    bad = tmp_path / "checkpoints" / "step_000001.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    try:
        ckpt.load_checkpoint(bad)
    except ValueError as e:
        assert "cannot be read" in str(e)
    else:
        raise AssertionError("expected ValueError")
