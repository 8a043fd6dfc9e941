"""The engine on the real default model (SmolLM2-135M-Instruct, converted once from the bundled GGUF)."""

from __future__ import annotations

from crescent.engine.llm_engine import LLMEngine
from crescent.engine.sampling_params import SamplingParams
from crescent.engine.settings import EngineSettings


def test_capital_of_france_is_paris():
    engine = LLMEngine.from_settings(EngineSettings(model="default", device="cpu", num_kv_blocks=32, torch_threads=1))
    assert engine.model_id == "SmolLM2-135M-Instruct"
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.text, out.text
    assert out.completion_tokens == len(out.token_ids) <= 24


def test_bf16_quality_against_fp32():
    """The dtype `auto` picks on CPUs with native bf16: greedy output agrees with float32 on the default model and
    perplexity stays within 2% (measured here; bf16 runs emulated and slowly on CPUs without it, hence few tokens)."""
    import math

    import torch

    prompts = ["What is the capital of France?", "Name three primary colors."]
    texts, ppl = {}, {}
    for dtype in ("float32", "bfloat16"):
        engine = LLMEngine.from_settings(EngineSettings(model="default", device="cpu", dtype=dtype, num_kv_blocks=32,
                                                        torch_threads=1))
        tok = engine.tokenizer
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
        texts[dtype] = [o.token_ids for o in engine.generate(ids, SamplingParams(temperature=0, max_tokens=8))]
        doc = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 2)])
        with torch.no_grad():
            logits = engine.model.forward_dense(doc)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], doc[0, 1:])
        ppl[dtype] = math.exp(nll.item())
    agree = [sum(a == b for a, b in zip(x, y, strict=False)) / len(x) for x, y in
             zip(texts["float32"], texts["bfloat16"], strict=True)]
    assert min(agree) >= 0.5 and sum(agree) / len(agree) >= 0.8, agree
    assert abs(ppl["bfloat16"] / ppl["float32"] - 1) < 0.02, ppl


def test_auto_dtype_follows_native_bf16():
    from crescent.engine.settings import cpu_has_native_bf16

    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu sse avx2 avx512f\n")
    assert not cpu_has_native_bf16("")
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert str(EngineSettings(device="cpu").resolved_dtype()) == f"torch.{expected}"
