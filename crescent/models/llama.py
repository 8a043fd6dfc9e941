"""A Llama-family decoder (Llama, Qwen2) with per-layer full or MoBA attention, read top to bottom.

``LlamaForCausalLM -> DecoderLayer -> Attention / MLP (SwiGLU) / RMSNorm``. Parameter names follow HF
(``model.layers.3.self_attn.q_proj.weight``) so safetensors folders load as they are.

Two ways in:
- ``forward(input_ids [T], positions [T], ctx)``: the engine's varlen step over the paged KV cache; returns the
  final-normed hidden states ``[T, hidden]``; ``compute_logits`` turns the rows it needs into logits.
- ``forward_dense(input_ids [B, S])``: causal, no cache, differentiable logits (training, test oracles).

Inference speed (``prepare_for_inference``, which ``load_model`` calls): q/k/v and gate/up run as one matmul each
over fused weights whose slices *are* the original parameters (views), so the state dict, saving and in-place
reloads keep working; RoPE cos/sin come from a table indexed by position. The fused path runs only without
autograd (training keeps separate leaves) and only while the parameters still live in the fused storage.
"""

from __future__ import annotations

import math
import weakref

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
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel, same fp32 maths
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


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and *signed* sin ``[S, D]`` for ``apply_rope``: the sin's first half is negated, which folds
    rotate_half's minus sign into the table (``-x2 * s == x2 * -s`` exactly)."""
    freqs = positions.to(inv_freq.device, torch.float32)[:, None] * inv_freq[None, :]
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``[..., S, H, D]``; cos/signed sin ``[S, D]`` from ``rope_cos_sin`` (HF's half-split rotate_half layout)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)


class _RopeTable:
    """cos/signed-sin rows for positions ``[0, n)``, grown on demand: a lookup replaces 5 ops per forward."""

    def __init__(self) -> None:
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None

    def lookup(self, inv_freq: Tensor, positions: Tensor, min_rows: int) -> tuple[Tensor, Tensor]:
        if positions.device.type != "cpu" or not positions.numel():  # on a GPU a bounds check would sync
            return rope_cos_sin(inv_freq, positions)
        low, high = (int(v) for v in torch.aminmax(positions))
        if low < 0:
            raise ValueError(f"positions must be >= 0; got {low}")
        if self.cos is None or self.cos.shape[0] <= high or self.cos.device != inv_freq.device:
            rows = torch.arange(max(high + 1, min_rows), device=inv_freq.device)
            self.cos, self.sin = rope_cos_sin(inv_freq, rows)
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


FEW_ROWS = 2
"""Up to this many rows, a matmul uses the input-major copy (see ``_FewRowsCopy``)."""


MID_ROWS = 32
"""From FEW_ROWS + 1 up to this many rows, an fp32 CPU matmul runs weight-first (see ``_weight_first``)."""


def _weight_first(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """``x @ weight.T`` computed as ``(weight @ x.T).T`` for a decode-sized batch on CPU, or None where that does not
    apply. Measured here (MKL, 2 threads, AMD EPYC, fp32, SmolLM2's q/k/v, o, gate/up, down and lm_head shapes,
    weights streamed from DRAM): 3-32 rows ran 1.05-2.2x faster weight-first, the lm_head (49,152 x 576) 1.1-2.2x;
    64-128 rows were mixed (0.6-1.5x), so larger batches (prefill) keep the plain product. Inference only."""
    if (x.dim() != 2 or not FEW_ROWS < x.shape[0] <= MID_ROWS or x.device.type != "cpu"
            or x.dtype != torch.float32 or torch.is_grad_enabled()):
        return None
    out = torch.mm(weight, x.t()).t().contiguous()
    return out if bias is None else out.add_(bias)


def _linear(module: nn.Linear, x: Tensor) -> Tensor:
    out = _weight_first(x, module.weight, module.bias)
    return module(x) if out is None else out


def _input_major(weight: Tensor) -> Tensor:
    """The same ``[out, in]`` matrix stored ``[in, out]``-contiguous (a transposed view)."""
    return weight.t().contiguous().t()


class _FewRowsCopy:
    """An input-major copy of a wide weight, for matmuls of 1-2 rows (decode steps of one or two sequences) on CPU.

    Measured here (MKL, one thread, weights streamed from DRAM): 1-2 rows times q/k/v, gate/up or the lm_head run
    1.4-2.2x faster against ``[in, out]`` storage, but 4 rows already run ~15% slower and 16 rows 20-40% slower,
    so the row-major weight stays for everything else. Costs one more copy of those weights. Used only while the source is unchanged: same
    storage and no in-place update since (hot reloads copy into parameters in place, bumping the version counter
    that views share with their base).
    """

    def __init__(self, weight: Tensor) -> None:
        self.source = weakref.ref(weight)  # not a strong ref: a replaced weight must stay freeable
        self.weight = _input_major(weight.detach())
        self._stamp = (weight.data_ptr(), weight._version)

    def applies(self, x: Tensor, weight: Tensor) -> bool:
        return (x.dim() == 2 and x.shape[0] <= FEW_ROWS and weight is self.source()
                and (weight.data_ptr(), weight._version) == self._stamp)


def _few_rows_copy(weight: Tensor) -> _FewRowsCopy | None:
    # Inference tensors keep no version counter, so a copy of one could go stale unnoticed.
    return _FewRowsCopy(weight) if weight.device.type == "cpu" and not weight.is_inference() else None


class _Fused:
    """Linears sharing an input as one matmul: their weights (and biases) concatenated by rows, each module's
    parameters then made views of the result, so the modules still own their named tensors (state dict, saving
    and in-place reloads unchanged)."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
        row = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(self.weight[row : row + n], requires_grad=lin.weight.requires_grad)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias[row : row + n], requires_grad=lin.bias.requires_grad)
            row += n
        self._linears = linears
        self._ptrs = self._current_ptrs()
        self.few_rows = _few_rows_copy(self.weight)

    def _current_ptrs(self) -> tuple[int, ...]:
        return tuple(lin.weight.data_ptr() for lin in self._linears)

    def intact(self) -> bool:
        """The parameters still live in the fused storage (not moved, cast or replaced since fusing)."""
        return self._current_ptrs() == self._ptrs

    def usable(self) -> bool:
        """Intact, and no autograd: training needs the separate leaves' graphs."""
        return not torch.is_grad_enabled() and self.intact()

    def __call__(self, x: Tensor) -> Tensor:
        if self.few_rows is not None and self.few_rows.applies(x, self.weight):
            return F.linear(x, self.few_rows.weight, self.bias)
        out = _weight_first(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if out is None else out


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
        self.fused_qkv: _Fused | None = None

    def fuse(self) -> None:
        if self.fused_qkv is None or not self.fused_qkv.intact():
            self.fused_qkv = _Fused([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext | None,
                backend: AttentionBackend) -> Tensor:
        lead = x.shape[:-1]
        if self.fused_qkv is not None and self.fused_qkv.usable():
            heads = self.fused_qkv(x).view(*lead, self.n_heads + 2 * self.n_kv, self.head_dim)
            qk = apply_rope(heads[..., : self.n_heads + self.n_kv, :], cos, sin)  # q and k rotated together
            q, k = qk[..., : self.n_heads, :], qk[..., self.n_heads :, :]
            v = heads[..., self.n_heads + self.n_kv :, :]
        else:
            q = apply_rope(self.q_proj(x).view(*lead, self.n_heads, self.head_dim), cos, sin)
            k = apply_rope(self.k_proj(x).view(*lead, self.n_kv, self.head_dim), cos, sin)
            v = self.v_proj(x).view(*lead, self.n_kv, self.head_dim)
        if ctx is None:
            out = backend.attend_dense(q, k, v, self.spec)
        else:
            out = backend.attend(self.layer_idx, q, k, v, ctx, self.spec)
        return _linear(self.o_proj, out.reshape(*lead, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.fused_gate_up: _Fused | None = None

    def fuse(self) -> None:
        if self.fused_gate_up is None or not self.fused_gate_up.intact():
            self.fused_gate_up = _Fused([self.gate_proj, self.up_proj])

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_gate_up is not None and self.fused_gate_up.usable():
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
            return _linear(self.down_proj, F.silu(gate) * up)
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
        weight = torch.empty(config.vocab_size, config.hidden_size)
        # Built on the meta device (the loader) there is nothing to draw, and Embedding's own normal_ there imports
        # torch._dynamo: ~10 s of every worker's start (and of each restart after a crash).
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
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
        self._rope = _RopeTable()
        self._head_few_rows: _FewRowsCopy | None = None

    def prepare_for_inference(self) -> LlamaForCausalLM:
        """Fuse q/k/v and gate/up into single matmuls and, on CPU, keep input-major copies of them and of the
        lm_head for one/two-row steps (see ``_FewRowsCopy``; ~70% more weight memory). Idempotent; returns self.

        Parameter names, shapes and values are unchanged (fused ones become views of the fused tensors). Call it
        again after moving the model (``.to``) or replacing parameters: until then the plain path runs.
        """
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, even when called in inference mode
            for layer in self.model.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()
            self._head_few_rows = _few_rows_copy(self.lm_head.weight)
        self._rope = _RopeTable()
        return self

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
        head = self._head_few_rows
        if head is not None and not torch.is_grad_enabled() and head.applies(hidden, self.lm_head.weight):
            return F.linear(hidden, head.weight).float()
        return _linear(self.lm_head, hidden).float()

    def _run(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext | None) -> Tensor:
        cos, sin = self._rope.lookup(self.inv_freq, positions, self.config.max_position_embeddings)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx, self.attention_backend)
        return self.model.norm(x)
