"""A Llama-family decoder (Llama, Qwen2) with per-layer full or MoBA attention, read top to bottom.

``LlamaForCausalLM -> DecoderLayer -> Attention / MLP (SwiGLU) / RMSNorm``. Parameter names follow HF
(``model.layers.3.self_attn.q_proj.weight``) so safetensors folders load as they are.

Two ways in:
- ``forward(input_ids [T], positions [T], ctx)``: the engine's varlen step over the paged KV cache; returns the
  final-normed hidden states ``[T, hidden]``; ``compute_logits`` turns the rows it needs into logits.
- ``forward_dense(input_ids [B, S])``: causal, no cache, differentiable logits (training, test oracles).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crescent.models.attention import AttentionBackend, TorchAttentionBackend
from crescent.models.attention_context import AttentionContext
from crescent.models.config import AttentionSpec, ModelConfig, rope_type


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as HF does): bf16 sums of squares lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Rotary inverse frequencies ``[head_dim // 2]`` (fp32), with HF's linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    kind = rope_type(config.rope_scaling)
    if kind == "linear":
        return inv_freq / float(config.rope_scaling["factor"])
    if kind == "llama3":
        s = config.rope_scaling
        factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old_len = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        # Between the two wavelength cut-offs, interpolate smoothly between scaled and unscaled.
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``[..., S, H, D]``; cos/sin ``[S, D]`` (HF's half-split layout: rotate_half, not interleaved pairs)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.spec: AttentionSpec = config.layer_attention[layer_idx]
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_kv_heads, config.head_dim
        hidden, qkv_bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.o_proj_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext | None,
                backend: AttentionBackend) -> Tensor:
        lead = x.shape[:-1]
        q = apply_rope(self.q_proj(x).view(*lead, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(*lead, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(*lead, self.n_kv, self.head_dim)
        if ctx is None:
            out = backend.attend_dense(q, k, v, self.spec)
        else:
            out = backend.attend(self.layer_idx, q, k, v, ctx, self.spec)
        return self.o_proj(out.reshape(*lead, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext | None,
                backend: AttentionBackend) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The HF ``model.`` prefix: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # Explicit CPU device: stays a real tensor even when the model is built on the meta device.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.attention_backend: AttentionBackend = backend or TorchAttentionBackend()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        self.attention_backend = backend

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext) -> Tensor:
        """Varlen step over the paged cache: ``input_ids``/``positions`` ``[T]`` -> normed hidden ``[T, hidden]``."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"forward takes flat input_ids/positions [T]; got {tuple(input_ids.shape)} and "
                             f"{tuple(positions.shape)}")
        return self._run(input_ids, positions, ctx)

    def forward_dense(self, input_ids: Tensor) -> Tensor:
        """Causal forward with no cache: ``input_ids [B, S]`` -> float32 logits ``[B, S, vocab]``."""
        if input_ids.dim() != 2:
            raise ValueError(f"forward_dense takes input_ids [B, S]; got {tuple(input_ids.shape)}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.compute_logits(self._run(input_ids, positions, None))

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Normed hidden rows ``[N, hidden]`` (or any leading shape) -> float32 logits ``[N, vocab]``."""
        return self.lm_head(hidden).float()

    def _run(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext | None) -> Tensor:
        freqs = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx, self.attention_backend)
        return self.model.norm(x)
