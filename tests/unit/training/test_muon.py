"""Muon: the Newton-Schulz core, the update's RMS, parameter routing, and torch.optim.Muon == Moonlight."""

from __future__ import annotations

import torch
from torch import nn

from crescent.training.muon import (
    HybridOptimizer,
    apply_update_,
    muon_update,
    newton_schulz,
    route_parameters,
)


def test_newton_schulz_singular_values_near_one():
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 128), (96, 48), (32, 32)]:
        grad = torch.randn(*shape, generator=g) * 3.0
        sv = torch.linalg.svdvals(newton_schulz(grad).float())
        # The quintic trades exact convergence for speed: singular values land in ~[0.7, 1.2], not at exactly 1.
        assert sv.min() > 0.5 and sv.max() < 1.5, (shape, sv.min(), sv.max())
        assert abs(sv.mean().item() - 1.0) < 0.25


def test_newton_schulz_rejects_non_matrix():
    try:
        newton_schulz(torch.ones(3))
    except ValueError as e:
        assert "2-D" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_update_rms_matches_adamw_scale():
    g = torch.Generator().manual_seed(1)
    for shape in [(128, 256), (256, 64)]:
        grad = torch.randn(*shape, generator=g)
        update = muon_update(grad, torch.zeros(shape))
        rms = update.pow(2).mean().sqrt().item()
        assert 0.15 < rms < 0.25, (shape, rms)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.proj(self.embed_tokens(ids))))


def test_routing_sends_hidden_matrices_to_muon_only():
    route = route_parameters(_Tiny())
    assert [n for n, _ in route.muon] == ["proj.weight"]
    assert sorted(n for n, _ in route.adamw) == sorted(
        ["embed_tokens.weight", "proj.bias", "norm.weight", "norm.bias", "lm_head.weight"])


def test_routing_tied_head_is_adamw_once():
    model = _Tiny()
    model.lm_head = nn.Linear(16, 50, bias=False)
    model.lm_head.weight = model.embed_tokens.weight
    route = route_parameters(model)
    assert sum(p is model.embed_tokens.weight for _, p in route.adamw) == 1
    assert all(p is not model.embed_tokens.weight for _, p in route.muon)


def test_torch_muon_is_moonlight_functional_core():
    """torch.optim.Muon(adjust_lr_fn='match_rms_adamw') steps like our Moonlight specification."""
    torch.manual_seed(2)
    w_ref = torch.randn(48, 80)
    w_torch = nn.Parameter(w_ref.clone())
    opt = torch.optim.Muon([w_torch], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    buf = torch.zeros_like(w_ref)
    for _ in range(4):
        grad = torch.randn(48, 80)
        w_torch.grad = grad.clone()
        opt.step()
        apply_update_(w_ref, muon_update(grad, buf), lr=0.02, weight_decay=0.1)
    # bf16 Newton-Schulz on inputs that differ by a scale: equal up to bf16 rounding.
    assert torch.allclose(w_torch.detach(), w_ref, atol=2e-3), (w_torch.detach() - w_ref).abs().max()


def test_hybrid_optimizer_trains_and_round_trips_state():
    torch.manual_seed(3)
    model = _Tiny()
    opt = HybridOptimizer(model, lr=0.01)
    assert set(opt.optimizers) == {"muon", "adamw"}
    ids = torch.randint(0, 50, (4, 8))
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
    state = opt.state_dict()
    other = HybridOptimizer(model, lr=0.01)
    other.load_state_dict(state)
    assert torch.equal(other.optimizers["muon"].state_dict()["state"][0]["momentum_buffer"],
                       state["muon"]["state"][0]["momentum_buffer"])
    try:
        HybridOptimizer(model, lr=0.01, kind="adamw").load_state_dict(state)
    except ValueError as e:
        assert "muon" in str(e)
    else:
        raise AssertionError("expected ValueError")
