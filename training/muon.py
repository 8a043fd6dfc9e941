"""Muon, Moonlight's variant ("Muon is Scalable for LLM Training", Moonshot AI 2025), plus AdamW for the rest.

For a 2-D hidden matrix W of shape [A, B] with gradient G:

    M <- mu * M + G                        (mu = 0.95)
    U <- G + mu * M                        (Nesterov)
    O <- NewtonSchulz5(U / ||U||_F)        (coefficients 3.4445, -4.7750, 2.0315; bf16)
    W <- W - lr * (0.2 * sqrt(max(A, B)) * O + wd * W)

The 0.2 * sqrt(max(A, B)) factor gives the update the RMS of a typical AdamW update (~0.2), so Muon reuses AdamW's
lr and weight decay; embeddings, the output head, norms and biases use AdamW with that same lr and wd.

``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` (torch >= 2.9) is exactly this, with one cosmetic difference
checked by the tests: it keeps the momentum as an EMA (``M <- mu M + (1 - mu) G``), which is Moonlight's buffer times
(1 - mu); the Newton-Schulz input is normalized by its Frobenius norm, so the scale cancels. We therefore step with
torch's implementation and keep the functional core below as the readable specification it is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOMENTUM = 0.95
ADAMW_BETAS = (0.9, 0.95)  # Moonlight's AdamW betas for the non-matrix parameters


def newton_schulz(grad: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    """Approximate U V^T of ``grad = U S V^T`` with a quintic Newton-Schulz iteration, in bf16.

    Dividing by the Frobenius norm bounds the spectral norm by 1, inside the iteration's basin. The coefficients
    maximize the slope at 0, so small singular values grow fast; the price is that the outputs land in roughly
    [0.7, 1.2] instead of exactly 1, which does not hurt training. We iterate on the wide orientation so the Gram
    matrix X X^T is the smaller one.
    """
    if grad.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = coefficients
    x = grad.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_update(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float = MOMENTUM,
                nesterov: bool = True) -> torch.Tensor:
    """Moonlight's update direction for one matrix: ``0.2 * sqrt(max(A, B)) * O``. Advances ``momentum_buffer``."""
    momentum_buffer.mul_(momentum).add_(grad)
    direction = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    ortho = newton_schulz(direction).to(grad.dtype)
    return ortho * (0.2 * math.sqrt(max(grad.shape[0], grad.shape[1])))


def apply_update_(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``W <- W - lr * (update + wd * W)`` (decoupled weight decay)."""
    param.mul_(1.0 - lr * weight_decay).add_(update, alpha=-lr)


@dataclass
class ParamRoute:
    """Which optimizer owns each parameter (names kept for logging and tests)."""

    muon: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    adamw: list[tuple[str, nn.Parameter]] = field(default_factory=list)


_HEAD_NAMES = ("lm_head", "output", "embed_tokens", "wte", "tok_embeddings")


def route_parameters(model: nn.Module) -> ParamRoute:
    """2-D hidden matrices -> Muon; embeddings, the output head (tied or not), norms and biases -> AdamW."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    route = ParamRoute()
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        leaf = name.split(".")
        is_head = id(param) in embedding_ids or any(part in _HEAD_NAMES for part in leaf)
        (route.muon if param.ndim == 2 and not is_head else route.adamw).append((name, param))
    return route


class HybridOptimizer:
    """Muon on hidden matrices + AdamW on the rest, behind one step/zero_grad/state_dict interface.

    ``kind="adamw"`` puts every parameter on AdamW (the baseline the benchmark compares against). ``adamw_lr``
    gives the AdamW part its own lr (RL uses a smaller one; see RLSettings.embedding_lr); ``set_lr`` sets both.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.1, kind: str = "muon",
                 adamw_lr: float | None = None) -> None:
        if kind not in ("muon", "adamw"):
            raise ValueError(f"optimizer kind must be 'muon' or 'adamw', got {kind!r}")
        route = route_parameters(model)
        self.kind = kind
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        adamw_params = [p for _, p in route.adamw]
        if kind == "muon" and route.muon:
            self.optimizers["muon"] = torch.optim.Muon(
                [p for _, p in route.muon], lr=lr, weight_decay=weight_decay, momentum=MOMENTUM, nesterov=True,
                ns_coefficients=NS_COEFFICIENTS, ns_steps=NS_STEPS, adjust_lr_fn="match_rms_adamw")
        else:
            adamw_params = [p for _, p in route.muon] + adamw_params
        if adamw_params:
            self.optimizers["adamw"] = torch.optim.AdamW(adamw_params, lr=lr if adamw_lr is None else adamw_lr,
                                                         weight_decay=weight_decay,
                                                         betas=ADAMW_BETAS, eps=1e-8)

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"optimizer state is for {state.get('kind')!r}, this optimizer is {self.kind!r}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
