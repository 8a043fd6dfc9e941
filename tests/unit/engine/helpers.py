"""Shared pieces of the engine tests: a tiny random Llama, the naive greedy oracle, engine construction."""

from __future__ import annotations

import torch

from crescent.engine.llm_engine import LLMEngine
from crescent.engine.settings import EngineSettings
from crescent.models.config import ModelConfig
from crescent.models.llama import LlamaForCausalLM

VOCAB = 257  # 256 bytes + EOS, so tests/unit/engine/byte_tokenizer.py decodes its outputs


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """Random 2-layer GQA model in float64: greedy comparisons between the paged and the dense path never hinge on
    float32 rounding."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=256)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # sharper logits than the default init, so outputs vary with the context
        model.lm_head.weight.mul_(8.0)
    return model


def make_engine(model, tokenizer=None, **overrides) -> LLMEngine:
    settings = dict(model="tiny", kv_block_size=4, num_kv_blocks=128, max_num_batched_tokens=256, max_num_seqs=16)
    settings.update(overrides)
    return LLMEngine(model, tokenizer, EngineSettings(**settings))


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Full-recompute greedy decoding with forward_dense (no KV cache): the oracle the engine must match."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_tokens):
            ids.append(int(torch.argmax(model.forward_dense(torch.tensor([ids]))[0, -1])))
    return ids[len(prompt):]


def prompts(n: int, seed: int = 1, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB - 1, (n_,), generator=g).tolist() for n_ in lens]
