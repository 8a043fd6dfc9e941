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
