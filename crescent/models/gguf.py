"""Convert a llama.cpp GGUF (Llama architecture, gpt2-style BPE) into an HF safetensors folder.

Weights are dequantized to fp32 with the ``gguf`` package. llama.cpp's converter permutes ``attn_q``/``attn_k``
rows for its interleaved rotary layout; we undo that so the weights fit HF's half-split RoPE. The tokenizer.json is
rebuilt from ``tokenizer.ggml.tokens``/``merges`` as a byte-level BPE, control tokens registered as special.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from crescent.models.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_CONTROL_TOKEN = 3  # llama.cpp token_type for control (special) tokens


class GGUFConversionError(ValueError):
    """The GGUF file is not one this converter understands."""


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json."""
    from gguf import GGUFReader  # imported here: only conversion needs it

    reader = GGUFReader(str(gguf_path))
    meta = {name: _field_value(field) for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"{gguf_path}: general.architecture={arch!r}; only 'llama' GGUFs convert")
    tensors = {t.name for t in reader.tensors}
    config = _config_from_metadata(meta, reader, tie="output.weight" not in tensors)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_hf_state_dict(reader, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    _write_tokenizer(reader, meta, config, out)
    return out


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``w.reshape(n_head, 2, d // n_head // 2, -1).swapaxes(1, 2)`` row permutation."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # exotic field types we never read
        return None


def _config_from_metadata(meta: dict[str, Any], reader: Any, tie: bool) -> ModelConfig:
    def need(key: str) -> Any:
        if meta.get(f"llama.{key}") is None:
            raise GGUFConversionError(f"GGUF metadata lacks llama.{key}")
        return meta[f"llama.{key}"]

    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size") or (len(tokens_field.data) if tokens_field else None)
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    scaling = None
    if meta.get("llama.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    tok = {k: _field_value(f) for k, f in reader.fields.items() if k.endswith("_token_id")}
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv") or heads),
        head_dim=int(meta.get("llama.rope.dimension_count") or hidden // heads),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(meta.get("llama.context_length", 2048)), tie_word_embeddings=tie,
        bos_token_id=tok.get("tokenizer.ggml.bos_token_id"), eos_token_id=tok.get("tokenizer.ggml.eos_token_id"),
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise GGUFConversionError(f"GGUF tensor {gguf_name!r} has no HF counterpart in a Llama model")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _hf_state_dict(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        # GGUF lists dims fastest-first; numpy/torch want them slowest-first.
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rotary(w, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rotary(w, config.num_key_value_heads)
        state[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: F32 tensors are read-only mmaps
    return state


def _write_tokenizer(reader: Any, meta: dict[str, Any], config: ModelConfig, out: Path) -> None:
    fields = reader.fields
    kind = _field_value(fields["tokenizer.ggml.model"]) if "tokenizer.ggml.model" in fields else None
    if kind != "gpt2":
        raise GGUFConversionError("only gpt2-style byte-level BPE GGUF tokenizers (tokenizer.ggml.model=gpt2) convert")
    tokens: list[str] = fields["tokenizer.ggml.tokens"].contents()
    types: list[int] = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    # SmolLM2's pre-tokenizer ("smollm" in llama.cpp): split digits one by one, then the GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL_TOKEN])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        idx = _field_value(fields[key]) if key in fields else None
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_prefix_space": False,
            "bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id"),
            "unk_token": token("tokenizer.ggml.unknown_token_id"),
            "pad_token": token("tokenizer.ggml.padding_token_id"),
            "model_max_length": config.max_position_embeddings,
            "chat_template": _field_value(fields["tokenizer.chat_template"])
            if "tokenizer.chat_template" in fields else None}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
