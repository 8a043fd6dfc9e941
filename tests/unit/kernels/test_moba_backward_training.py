"""Training through the MoBA Triton backward: a tiny model's loss gradients with the Triton attention backend
equal those with the torch reference backend (CPU, Triton interpreter; see interpreter.py)."""

from __future__ import annotations

import pytest
import torch

from crescent.models.config import ModelConfig, with_attention
from crescent.training.pretrain import build_model, lm_loss, training_attention
from tests.unit.kernels.interpreter import (  # interpreter_env: the autouse fixture
    DEV,
    TRAINING_KERNELS,
    fresh_interpreter_test,
    interpreter_env,  # noqa: F401
    kernels_marker,
    load_kernels,
)

_MODS = load_kernels(TRAINING_KERNELS)
needs_kernels = kernels_marker(_MODS)
test_in_fresh_interpreter = fresh_interpreter_test(_MODS, __file__)


def _config(head_dim: int = 16) -> ModelConfig:
    base = ModelConfig(vocab_size=50, hidden_size=4 * head_dim, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)
    return with_attention(base, "moba", moba_block_size=8, moba_topk=2, full_layers=[0])


def test_auto_keeps_the_reference_on_cpu_and_picks_the_kernels_on_cuda():
    assert training_attention("auto", "cpu", _config()) == "torch"
    assert training_attention("auto", "cuda", _config()) == "triton"
    assert training_attention("auto", "cuda:0", _config(head_dim=24)) == "torch"  # the kernels need 2^n >= 16
    with pytest.raises(ValueError, match="power of two"):
        training_attention("triton", "cuda", _config(head_dim=24))
    with pytest.raises(ValueError, match="auto, torch or triton"):
        training_attention("flex", "cuda", _config())
    model = build_model(_config(), seed=0, device="cpu", attention_backend="auto")
    assert type(model.attention_backend).__name__ == "TorchAttentionBackend"


@needs_kernels
def test_loss_gradients_through_the_kernels_equal_the_reference():
    inputs = torch.randint(0, 50, (2, 29), generator=torch.Generator().manual_seed(0)).to(DEV)
    targets = torch.roll(inputs, -1, dims=1)
    grads = {}
    for name in ("torch", "triton"):
        model = build_model(_config(), seed=0, device=DEV, attention_backend=name)
        assert type(model.attention_backend).__name__.lower().startswith(name)
        lm_loss(model, inputs, targets).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    moba_layer = "model.layers.1.self_attn.q_proj.weight"
    assert grads["triton"][moba_layer].abs().sum() > 0  # the MoBA layer's attention is in the graph
    for n, want in grads["torch"].items():
        got = grads["triton"][n]
        assert float((got - want).norm() / want.norm().clamp_min(1e-12)) < 1e-4, n
