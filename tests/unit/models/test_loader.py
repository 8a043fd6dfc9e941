"""HF folder save/load round trip, sharded weights, and a clear ModelLoadError for every broken folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crescent.models.config import AttentionSpec, with_attention
from crescent.models.loader import load_model, save_model
from crescent.models.registry import ModelLoadError
from tests.unit.models.helpers import tiny_config, tiny_model


@pytest.fixture
def tok_dir(tmp_path_factory, default_model_dir) -> Path:
    """Only the SmolLM2 tokenizer files (no 540 MB of weights copied)."""
    out = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(default_model_dir / name, out / name)
    return out


@pytest.fixture
def saved(tmp_path, tok_dir):
    cfg = tiny_config(vocab_size=49152, tie_word_embeddings=True,
                      layer_attention=[AttentionSpec("moba", 8, 2), AttentionSpec("full")])
    model = tiny_model(cfg, seed=1)
    return model, save_model(model, tmp_path / "m", tokenizer_dir=tok_dir)


def test_round_trip_gives_same_logits(saved):
    model, folder = saved
    loaded, tok, cfg = load_model(folder)
    assert cfg.layer_attention == model.config.layer_attention and cfg.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([tok.encode("a tiny model, round-tripped through safetensors")])
    torch.testing.assert_close(loaded.forward_dense(ids), model.forward_dense(ids), atol=0, rtol=0)
    bf16, _, _ = load_model(folder, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_sharded_weights_and_attention_override(saved):
    model, folder = saved
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _, _ = load_model(folder)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
    torch.testing.assert_close(loaded.forward_dense(ids), model.forward_dense(ids), atol=0, rtol=0)
    full, _, cfg = load_model(folder, config=with_attention(model.config, "full"))
    assert all(s.kind == "full" for s in cfg.layer_attention)


def _break(folder: Path, how: str) -> None:
    if how == "no_folder":
        shutil.rmtree(folder)
    elif how == "no_config":
        (folder / "config.json").unlink()
    elif how == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif how == "bad_arch":
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
        (folder / "config.json").write_text(json.dumps(cfg))
    elif how == "no_weights":
        (folder / "model.safetensors").unlink()
    elif how == "missing_tensor":
        state = load_file(folder / "model.safetensors")
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, str(folder / "model.safetensors"))
    elif how == "bad_shape":
        state = load_file(folder / "model.safetensors")
        state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
        save_file(state, str(folder / "model.safetensors"))
    elif how == "corrupt_weights":
        (folder / "model.safetensors").write_bytes(b"\x00\x01garbage")
    elif how == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "bad_field":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["num_key_value_heads"] = 3
        (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how,message", [
    ("no_folder", "does not exist"),
    ("no_config", "config.json is missing"),
    ("bad_json", "config.json is not valid JSON"),
    ("bad_arch", "MixtralForCausalLM"),
    ("bad_field", "num_key_value_heads=3"),
    ("no_weights", "no \\*.safetensors"),
    ("missing_tensor", "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("bad_shape", "'model.layers.0.self_attn.k_proj.weight' has shape \\(3, 3\\)"),
    ("corrupt_weights", "model.safetensors cannot be read"),
    ("no_tokenizer", "tokenizer.json is missing"),
])
def test_broken_folder_raises_clear_error(saved, how, message):
    _, folder = saved
    _break(folder, how)
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder)
