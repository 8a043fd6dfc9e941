"""The model's shape and per-layer attention, read from / written to an HF ``config.json``.

Crescent's own key in config.json is ``crescent_attention``::

    "crescent_attention": {"kind": "moba", "moba_block_size": 64, "moba_topk": 3, "full_layers": [0, 29]}

Layers listed in ``full_layers`` keep full attention; every other layer uses MoBA. Without the key every layer is
full attention (any stock Llama/Qwen2 folder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

AttentionKind = Literal["full", "moba"]
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends."""

    kind: AttentionKind = "full"
    """``full`` (causal softmax over the whole context) or ``moba`` (block-sparse, see kernels/moba)."""
    moba_block_size: int = 64
    """MoBA key block size in tokens (only for kind=moba)."""
    moba_topk: int = 3
    """Blocks each query attends to, counting its own block (only for kind=moba)."""

    def __post_init__(self) -> None:
        if self.kind not in ("full", "moba"):
            raise ValueError(f"attention kind {self.kind!r} is unknown: use 'full' or 'moba'")
        if self.kind == "moba":
            if self.moba_block_size < 1:
                raise ValueError(f"moba_block_size={self.moba_block_size}: must be a positive number of tokens")
            if self.moba_topk < 1:
                raise ValueError(f"moba_topk={self.moba_topk}: must be >= 1 (it counts the query's own block)")


@dataclass
class ModelConfig:
    """A Llama-family decoder (Llama, Qwen2) with per-layer full or MoBA attention."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None or an HF rope_scaling dict: rope_type 'linear' (factor) or 'llama3' (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings)."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2 always; Llama when its config says attention_bias)."""
    o_proj_bias: bool = False
    """Bias on the output projection (Llama's attention_bias also covers o_proj; Qwen2 never has it)."""
    mlp_bias: bool = False
    model_type: str = "llama"
    """'llama' or 'qwen2': decides the architecture name written back to config.json."""
    layer_attention: list[AttentionSpec] = field(default_factory=list)
    """One spec per layer; empty means all full attention."""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if not self.layer_attention:
            self.layer_attention = [AttentionSpec() for _ in range(self.num_hidden_layers)]
        self.validate()

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}: GQA needs whole groups")
        if self.model_type not in ("llama", "qwen2"):
            raise ValueError(f"model_type={self.model_type!r} is not supported: use 'llama' or 'qwen2'")
        # Only bias layouts that config.json can express, so a saved folder reloads (here and in HF) as it was.
        if self.model_type == "llama" and self.o_proj_bias != self.attention_bias:
            raise ValueError("o_proj_bias must equal attention_bias for model_type='llama' (HF's attention_bias "
                             "covers q/k/v and o_proj); use model_type='qwen2' for q/k/v-only bias")
        if self.model_type == "qwen2" and (not self.attention_bias or self.o_proj_bias):
            raise ValueError("model_type='qwen2' has q/k/v bias and no o_proj bias: set attention_bias=True, "
                             "o_proj_bias=False")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: rotary embeddings need an even head_dim")
        if len(self.layer_attention) != self.num_hidden_layers:
            raise ValueError(f"layer_attention has {len(self.layer_attention)} entries but num_hidden_layers="
                             f"{self.num_hidden_layers}: give one AttentionSpec per layer")
        rope_type(self.rope_scaling)

    # ---- HF config.json -------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF config.json; ValueError names the offending field."""
        if not isinstance(hf, dict):
            raise ValueError("config.json must hold a JSON object")
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(f"architectures={archs} is not supported: use one of {sorted(SUPPORTED_ARCHITECTURES)}")
        if model_type is None and archs:
            model_type = next(SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES)
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"model_type={model_type!r} is not supported: use 'llama' or 'qwen2'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: only 'silu' (SwiGLU)")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported: set it to false")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required field(s) {missing}")
        heads = int(hf["num_attention_heads"])
        bias = bool(hf.get("attention_bias", False))
        layers = int(hf["num_hidden_layers"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or 0),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=hf.get("rope_scaling"),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            attention_bias=True if model_type == "qwen2" else bias,
            o_proj_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            model_type=model_type,
            layer_attention=_layers_from_hf(hf.get("crescent_attention"), layers),
        )

    def to_hf(self) -> dict[str, Any]:
        arch = "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
        out: dict[str, Any] = {
            "architectures": [arch], "model_type": self.model_type, "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        moba = _layers_to_hf(self.layer_attention)
        if moba is not None:
            out["crescent_attention"] = moba
        return out


def with_attention(config: ModelConfig, kind: AttentionKind, moba_block_size: int = 64, moba_topk: int = 3,
                   full_layers: list[int] | tuple[int, ...] = ()) -> ModelConfig:
    """A copy of ``config`` serving every layer (except ``full_layers``) with ``kind`` attention.

    This is how a model trained with full attention is served with MoBA, training-free.
    """
    spec = {"kind": kind, "moba_block_size": moba_block_size, "moba_topk": moba_topk,
            "full_layers": list(full_layers)}
    return dataclasses.replace(config, layer_attention=_layers_from_hf(spec, config.num_hidden_layers))


def _layers_from_hf(spec: Any, num_layers: int) -> list[AttentionSpec]:
    if spec is None:
        return [AttentionSpec() for _ in range(num_layers)]
    if not isinstance(spec, dict):
        raise ValueError("crescent_attention must be an object like "
                         '{"kind": "moba", "moba_block_size": 64, "moba_topk": 3, "full_layers": []}')
    kind = spec.get("kind", "full")
    full_layers = spec.get("full_layers") or []
    bad = [i for i in full_layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"crescent_attention.full_layers has {bad}: layer indices must be in [0, {num_layers})")
    moba = AttentionSpec(kind, int(spec.get("moba_block_size", 64)), int(spec.get("moba_topk", 3)))
    if moba.kind == "full":
        moba = AttentionSpec()
    return [AttentionSpec() if i in full_layers else moba for i in range(num_layers)]


def _layers_to_hf(layers: list[AttentionSpec]) -> dict[str, Any] | None:
    moba = [s for s in layers if s.kind == "moba"]
    if not moba:
        return None
    if len(set(moba)) > 1:
        raise ValueError("MoBA layers with different block sizes / top-k cannot be written to config.json: "
                         "use one moba_block_size and moba_topk for every MoBA layer")
    full = [i for i, s in enumerate(layers) if s.kind == "full"]
    return {"kind": "moba", "moba_block_size": moba[0].moba_block_size, "moba_topk": moba[0].moba_topk,
            "full_layers": full}


def rope_type(scaling: dict[str, Any] | None) -> str:
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise ValueError("rope_scaling must be null or an object with 'rope_type'")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported: use one of {list(_ROPE_TYPES)} or null")
    if kind != "default" and "factor" not in scaling:
        raise ValueError(f"rope_scaling of type {kind!r} needs a 'factor'")
    return kind


class ModelLoadError(RuntimeError):
    """A model folder is missing, incomplete or inconsistent (here, not in loader.py: raising it needs no torch)."""
