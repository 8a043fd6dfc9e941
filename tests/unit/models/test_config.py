"""ModelConfig: HF round trip, crescent_attention, and ValueErrors that name the field."""

from __future__ import annotations

import pytest

from crescent.models.config import AttentionSpec, ModelConfig, with_attention

HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
      "rope_theta": 1e5, "tie_word_embeddings": True, "eos_token_id": [2, 3]}


def test_hf_round_trip_with_moba():
    hf = dict(HF, crescent_attention={"kind": "moba", "moba_block_size": 32, "moba_topk": 4, "full_layers": [0]})
    cfg = ModelConfig.from_hf(hf)
    assert cfg.head_dim == 16 and cfg.eos_token_ids == [2, 3]
    assert cfg.layer_attention[0] == AttentionSpec() and cfg.layer_attention[1] == AttentionSpec("moba", 32, 4)
    again = ModelConfig.from_hf(cfg.to_hf())
    assert again == cfg
    assert "crescent_attention" not in ModelConfig.from_hf(HF).to_hf()


def test_qwen2_implies_qkv_bias_only():
    cfg = ModelConfig.from_hf(dict(HF, architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    assert cfg.attention_bias and not cfg.o_proj_bias
    llama = ModelConfig.from_hf(dict(HF, attention_bias=True))
    assert llama.attention_bias and llama.o_proj_bias


def test_with_attention_serves_full_model_as_moba():
    cfg = ModelConfig.from_hf(HF)
    moba = with_attention(cfg, "moba", 64, 3, full_layers=[3])
    assert [s.kind for s in moba.layer_attention] == ["moba", "moba", "moba", "full"]
    assert all(s.kind == "full" for s in cfg.layer_attention)  # the original is untouched
    assert with_attention(moba, "full") == cfg


@pytest.mark.parametrize("change,field", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
    ({"crescent_attention": {"kind": "moba", "moba_topk": 0}}, "moba_topk"),
    ({"crescent_attention": {"kind": "sparse"}}, "attention kind"),
    ({"crescent_attention": {"kind": "moba", "full_layers": [9]}}, "full_layers"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_invalid_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(dict(HF, **change))


def test_missing_required_field():
    hf = dict(HF)
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf(hf)


def test_bias_layout_must_be_expressible_in_config_json():
    with pytest.raises(ValueError, match="o_proj_bias must equal attention_bias"):
        ModelConfig(**{k: v for k, v in HF.items() if k not in ("architectures", "model_type")},
                    attention_bias=True)
