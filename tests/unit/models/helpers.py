"""Tiny Llama-family models and the paged-vs-dense check that the model tests share."""

from __future__ import annotations

import torch

from crescent.models.config import ModelConfig
from crescent.models.llama import LlamaForCausalLM
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


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_against_dense(model: LlamaForCausalLM, block_size: int, lengths=(11, 5, 23), tol: float = 1e-4) -> None:
    """Prefill, a mixed chunked-prefill + decode step, then pure decode steps: each equals the dense logits."""
    driver = PagedDriver(model, block_size=block_size)
    full = {f"s{i}": random_tokens(n + 8, seed=i) for i, n in enumerate(lengths)}
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
