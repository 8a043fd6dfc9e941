"""Model preparation: the tiny-model CLI, path resolution, and the convert-once cache logic."""

from __future__ import annotations

import json

import pytest
import torch

from crescent.models import prepare, registry
from crescent.models.cli import model_cli
from crescent.models.loader import load_model
from crescent.models.registry import ModelLoadError
from tests.unit.models.paged import PagedDriver


def test_tiny_moba_model_via_cli_loads_and_serves(tmp_path, default_model_dir, capsys):
    out = tmp_path / "tiny"
    rc = model_cli(["tiny", str(out), "--attention", "moba", "--moba-block-size", "8", "--layers", "2",
                    "--hidden", "32", "--tokenizer-from", str(default_model_dir)])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    model, tok, cfg = load_model(out)
    assert cfg.vocab_size == 49152 and cfg.layer_attention[0].kind == "moba" and cfg.eos_token_ids == [2]
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say something long enough."}]))
    dense = model.forward_dense(torch.tensor([ids]))[0]
    paged = PagedDriver(model, block_size=8).step({"a": ids})["a"]
    torch.testing.assert_close(paged, dense, atol=1e-4, rtol=1e-4)


def test_cli_reports_errors(tmp_path, capsys):
    rc = model_cli(["tiny", str(tmp_path / "x"), "--tokenizer-from", str(tmp_path / "missing")])
    assert rc == 1 and "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        model_cli(["frobnicate"])


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="neither 'default' nor an existing model folder"):
        registry.resolve_model_path(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        registry.resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert registry.resolve_model_path(str(tmp_path)) == tmp_path


def test_ensure_default_model_converts_once_atomically(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf_path, out_dir):  # the real conversion is covered by test_default_model.py
        calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"n": len(calls)}))

    monkeypatch.setattr(prepare, "convert_gguf", fake_convert)
    stale = tmp_path / registry.DEFAULT_MODEL_NAME
    stale.mkdir()
    (stale / "half-written.safetensors").write_text("x")  # an interrupted conversion: no completion marker
    first = prepare.ensure_default_model(tmp_path)
    again = prepare.ensure_default_model(tmp_path)
    assert first == again == stale and len(calls) == 1
    assert not (stale / "half-written.safetensors").exists()
    assert calls[0] != stale  # converted into a temp folder, then renamed
    assert [p.name for p in tmp_path.iterdir()] == [registry.DEFAULT_MODEL_NAME]  # no temp leftovers
