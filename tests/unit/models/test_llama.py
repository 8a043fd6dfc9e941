"""The paged varlen forward equals the dense forward, for full and MoBA layers, Llama and Qwen2 variants."""

from __future__ import annotations

import pytest
import torch

from crescent.models.attention_context import AttentionContext, SeqSlice
from crescent.models.config import AttentionSpec, with_attention
from crescent.models.llama import LlamaForCausalLM, rope_inv_freq
from tests.unit.models.helpers import VOCAB, check_against_dense, random_tokens, tiny_config, tiny_model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_paged_forward_matches_dense_full_attention(tie):
    check_against_dense(tiny_model(tiny_config(tie_word_embeddings=tie)), block_size=4)


def test_paged_forward_matches_dense_qwen2_bias():
    cfg = tiny_config(model_type="qwen2", attention_bias=True)
    model = tiny_model(cfg)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None
    check_against_dense(model, block_size=4)


@pytest.mark.parametrize("page", [4, 16], ids=["moba-block-multiple-of-page", "page-larger-than-block"])
def test_paged_forward_matches_dense_moba_layers(page):
    cfg = tiny_config(layer_attention=[AttentionSpec("moba", 4, 2), AttentionSpec("full")])
    check_against_dense(tiny_model(cfg), block_size=page, lengths=(21, 9, 30))


def test_moba_changes_the_output_of_a_full_model():
    cfg = tiny_config()
    full = tiny_model(cfg)
    moba = LlamaForCausalLM(with_attention(cfg, "moba", 4, 1)).eval()
    moba.load_state_dict(full.state_dict())
    ids = torch.tensor([random_tokens(20, 1)])
    a, b = full.forward_dense(ids), moba.forward_dense(ids)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # the first block is its own block in both
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)


def test_uncached_varlen_forward_and_bad_input():
    model = tiny_model(tiny_config())
    toks = random_tokens(7, 3)
    ctx = AttentionContext(seqs=[SeqSlice(0, 7, 7, [])])
    hidden = model(torch.tensor(toks), torch.arange(7), ctx)
    torch.testing.assert_close(model.compute_logits(hidden), model.forward_dense(torch.tensor([toks]))[0])
    with pytest.raises(ValueError, match="flat input_ids"):
        model(torch.tensor([toks]), torch.arange(7)[None], ctx)


def test_forward_dense_is_differentiable_with_moba():
    cfg = tiny_config(layer_attention=[AttentionSpec("moba", 4, 2), AttentionSpec("moba", 4, 2)])
    model = tiny_model(cfg)
    ids = torch.tensor([random_tokens(17, 2), random_tokens(17, 4)])
    loss = torch.nn.functional.cross_entropy(model.forward_dense(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_rope_scaling_variants():
    base = rope_inv_freq(tiny_config())
    linear = rope_inv_freq(tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    torch.testing.assert_close(linear, base / 4)
    llama3 = rope_inv_freq(tiny_config(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    plain = rope_inv_freq(tiny_config(rope_theta=500000.0))
    assert llama3[0] == plain[0]  # highest frequency untouched
    torch.testing.assert_close(llama3[-1], plain[-1] / 8)  # lowest frequency divided by the factor
