"""Publishing: HF folder + manifest, atomic rename, latest_version, validate_checkpoint on broken folders,
and the serving loader reading what we publish."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from crescent.models import published
from crescent.models.loader import load_model
from crescent.models.published import CheckpointError, latest_version, validate_checkpoint
from crescent.training.pretrain import build_model, model_config
from crescent.training.publish import publish_checkpoint
from crescent.training.settings import ModelShapeSettings
from crescent.training.tokenizer import IM_END, special_id, train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "What is 12 + 30? 12 + 30 = 42"] * 20, vocab_size=300)
    shape = ModelShapeSettings(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                               moba_block_size=8, moba_topk=2, full_layers=[0])
    config = model_config(shape, tok.get_vocab_size(), 64, special_id(tok, IM_END))
    return build_model(config, seed=0, device="cpu"), config, tok


def test_publish_layout_manifest_and_loader_round_trip(tmp_path: Path, tiny):
    model, config, tok = tiny
    path = publish_checkpoint(model, config, tok, tmp_path, "m", step=200, metrics={"val_loss": 3.5})
    assert path == tmp_path / "m" / "v000200"
    assert {p.name for p in path.iterdir()} >= set(published.REQUIRED_FILES)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["v000200"]  # no temp folder left behind
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 200 and manifest["metrics"] == {"val_loss": 3.5} and manifest["commit"]
    assert "model.safetensors" in manifest["files"] and manifest["created_at"]
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    validate_checkpoint(path)
    served, tokenizer, served_config = load_model(path)
    assert served_config.layer_attention == config.layer_attention
    ids = torch.tensor([tokenizer.encode("What is 12 + 30?")])
    with torch.no_grad():
        assert torch.allclose(served.forward_dense(ids), model.forward_dense(ids), atol=1e-5)


def test_latest_version_orders_numerically_and_ignores_temp(tmp_path: Path, tiny):
    model, config, tok = tiny
    root = tmp_path / "m"
    assert latest_version(root) is None
    for step in (9, 100, 20):
        publish_checkpoint(model, config, tok, tmp_path, "m", step=step, metrics={})
    (root / ".v999999.tmp-1").mkdir()  # a publish in flight is invisible to readers
    assert latest_version(root) == root / "v000100"
    with pytest.raises(FileExistsError, match="immutable"):
        publish_checkpoint(model, config, tok, tmp_path, "m", step=100, metrics={})


def test_failed_publish_leaves_nothing(tmp_path: Path, tiny, monkeypatch):
    model, config, tok = tiny

    def broken_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        publish_checkpoint(model, config, tok, tmp_path, "m", step=1, metrics={})
    assert list((tmp_path / "m").iterdir()) == []
    assert latest_version(tmp_path / "m") is None


@pytest.mark.parametrize("damage, message", [
    ("remove_weights", "missing"),
    ("truncate_weights", "sha256"),
    ("bad_config", "sha256"),
    ("bad_manifest", "not valid JSON"),
])
def test_validate_checkpoint_rejects_broken_folders(tmp_path: Path, tiny, damage, message):
    model, config, tok = tiny
    path = publish_checkpoint(model, config, tok, tmp_path, "m", step=1, metrics={})
    weights = path / "model.safetensors"
    if damage == "remove_weights":
        weights.unlink()
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "bad_config":
        (path / "config.json").write_text("{}")
    else:
        (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(path)


def test_validate_checkpoint_checks_contents_not_only_hashes(tmp_path: Path, tiny):
    model, config, tok = tiny
    path = publish_checkpoint(model, config, tok, tmp_path, "m", step=1, metrics={})
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {}  # a hand-made folder without checksums still gets its contents checked
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="config.json"):
        validate_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        validate_checkpoint(tmp_path / "nope")
