"""Our model against HF transformers on tiny random folders: Llama variants and Qwen2 (q/k/v bias)."""

from __future__ import annotations

import pytest
import torch

from crescent.models.loader import save_model
from tests.unit.models.helpers import VOCAB, tiny_config, tiny_model

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("variant", [
    dict(),
    dict(tie_word_embeddings=True, attention_bias=True, o_proj_bias=True, rope_scaling=LLAMA3_ROPE),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=16),
    dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
], ids=["llama", "llama-tied-bias-rope3", "llama-linear-rope-wide-heads", "qwen2"])
def test_logits_match_transformers(tmp_path, variant):
    model = tiny_model(tiny_config(**variant), seed=3)
    folder = save_model(model, tmp_path / "m")
    cls = transformers.Qwen2ForCausalLM if variant.get("model_type") == "qwen2" else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_dense(ids), hf(ids).logits.float(), atol=1e-4, rtol=1e-4)
