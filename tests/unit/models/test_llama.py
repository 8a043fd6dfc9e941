"""The paged varlen forward equals the dense forward, for full and MoBA layers, Llama and Qwen2 variants."""

from __future__ import annotations

import pytest
import torch

from crescent.models.attention_context import AttentionContext, SeqSlice
from crescent.models.config import AttentionSpec, ModelConfig, with_attention
from crescent.models.llama import LlamaForCausalLM, rope_inv_freq
from tests.unit.models.paged import PagedDriver

VOCAB = 101


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(config: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong wiring cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_against_dense(model: LlamaForCausalLM, block_size: int, lengths=(11, 5, 23), tol: float = 1e-4) -> None:
    """Prefill, a mixed chunked-prefill + decode step, then pure decode steps: each equals the dense logits."""
    driver = PagedDriver(model, block_size=block_size)
    full = {f"s{i}": _tokens(n + 8, seed=i) for i, n in enumerate(lengths)}
    device = model.lm_head.weight.device
    with torch.inference_mode():
        dense = {name: model.forward_dense(torch.tensor([toks], device=device))[0] for name, toks in full.items()}
    plan = [  # (sequence -> how many next tokens) per step: prefill, mixed chunk + decode, then pure decode
        {"s0": lengths[0], "s1": lengths[1]},
        {"s0": 6, "s2": lengths[2], "s1": 1},
        {"s0": 1, "s1": 1, "s2": 1},
        {"s0": 1, "s1": 1, "s2": 1},
    ]
    done = {name: 0 for name in full}
    for step in plan:
        out = driver.step({name: full[name][done[name] : done[name] + n] for name, n in step.items()})
        for name, n in step.items():
            expect = dense[name][done[name] : done[name] + n]
            assert torch.isfinite(out[name]).all()
            torch.testing.assert_close(out[name], expect, atol=tol, rtol=tol)
            done[name] += n


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
    ids = torch.tensor([_tokens(20, 1)])
    a, b = full.forward_dense(ids), moba.forward_dense(ids)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # the first block is its own block in both
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)


def test_uncached_varlen_forward_and_bad_input():
    model = tiny_model(tiny_config())
    toks = _tokens(7, 3)
    ctx = AttentionContext(seqs=[SeqSlice(0, 7, 7, [])])
    hidden = model(torch.tensor(toks), torch.arange(7), ctx)
    torch.testing.assert_close(model.compute_logits(hidden), model.forward_dense(torch.tensor([toks]))[0])
    with pytest.raises(ValueError, match="flat input_ids"):
        model(torch.tensor([toks]), torch.arange(7)[None], ctx)


def test_forward_dense_is_differentiable_with_moba():
    cfg = tiny_config(layer_attention=[AttentionSpec("moba", 4, 2), AttentionSpec("moba", 4, 2)])
    model = tiny_model(cfg)
    ids = torch.tensor([_tokens(17, 2), _tokens(17, 4)])
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
