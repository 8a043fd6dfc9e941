"""The GGUF-converted SmolLM2: answers correctly, matches HF transformers, and its tokenizer round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crescent.models.gguf import unpermute_rotary
from crescent.models.prepare import ensure_default_model, prepare_model


def test_answers_capital_of_france_greedily(default_model):
    model, tok, _ = default_model
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids, out = tok.encode(prompt), []
    with torch.inference_mode():
        for _ in range(20):
            nxt = int(model.forward_dense(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt in tok.eos_token_ids:
                break
            out.append(nxt)
            if "Paris" in tok.decode(out):  # the answer is in: spare the loaded CI machine the rest
                break
    assert "Paris" in tok.decode(out)


def test_logits_match_transformers(default_model, default_model_dir):
    transformers = pytest.importorskip("transformers")
    model, tok, _ = default_model
    hf = transformers.LlamaForCausalLM.from_pretrained(default_model_dir, local_files_only=True,
                                                       torch_dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over 13 lazy dogs.")])
    with torch.inference_mode():
        ours, theirs = model.forward_dense(ids), hf(ids).logits.float()
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)


def test_tokenizer_round_trip_and_specials(default_model):
    _, tok, cfg = default_model
    text = "Hello, world! 2024 naïve café 😀\n\tindent  spaces"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1 and ids[-1] == tok.token_to_id("<|im_end|>") == 2
    assert tok.decode(ids) == "user\nhi"  # specials skipped
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode("123") == [tok.token_to_id(d) for d in "123"]  # SmolLM2 splits digits
    assert tok.vocab_size == cfg.vocab_size == 49152
    assert 2 in tok.eos_token_ids


def test_chat_template_renders_system_default(default_model):
    _, tok, _ = default_model
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False).endswith(
        "assistant\n")


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    n_head = 3
    permuted = w.reshape(n_head, 2, 12 // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_rotary(permuted, n_head), w)


def test_prepare_is_idempotent_and_resolvable(default_model_dir):
    assert ensure_default_model() == default_model_dir
    assert prepare_model("default") == default_model_dir
    assert prepare_model("SmolLM2-135M-Instruct") == default_model_dir
