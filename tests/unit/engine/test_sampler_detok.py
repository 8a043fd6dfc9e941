"""Sampler (greedy, top-k/top-p, seeds, logprobs), SamplingParams validation and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from crescent.engine.detokenizer import IncrementalDetokenizer
from crescent.engine.sampler import SampleRequest, sample
from crescent.engine.sampling_params import SamplingParams
from tests.unit.engine.byte_tokenizer import EOS, ByteTokenizer


def test_greedy_and_logprobs_top_n():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    reqs = [SampleRequest(SamplingParams(temperature=0, logprobs=2), 0), SampleRequest(SamplingParams(0.0), 0)]
    tokens, lps = sample(logits, reqs)
    assert tokens == [1, 0]
    tok, lp, top = lps[0]
    ref = torch.log_softmax(logits[0], -1)
    assert tok == 1 and lp == pytest.approx(float(ref[1]))
    assert [t for t, _ in top] == [1, 3] and top[1][1] == pytest.approx(float(ref[3]))
    assert lps[1] is None


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    k2 = sample(logits, [SampleRequest(SamplingParams(top_k=2), i) for i in range(200)])[0]
    assert set(k2) == {0, 1}
    p = sample(logits, [SampleRequest(SamplingParams(top_p=0.7), i) for i in range(200)])[0]
    assert set(p) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    p1 = sample(logits[:50], [SampleRequest(SamplingParams(top_p=0.4), i) for i in range(50)])[0]
    assert set(p1) == {0}


def test_seeded_sampling_ignores_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    mine = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(logits[3:4], [SampleRequest(mine, i)])[0][0] for i in range(6)]
    others = [SampleRequest(SamplingParams(temperature=0.8), 0) for _ in range(8)]
    batched = []
    for i in range(6):
        others[3] = SampleRequest(mine, i)
        batched.append(sample(logits, others)[0][3])
    assert alone == batched
    assert len(set(alone)) > 1  # it is really sampling, not argmax


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(3000, 1)
    tokens = torch.tensor(sample(logits, [SampleRequest(SamplingParams(seed=7), i) for i in range(3000)])[0])
    freq = torch.bincount(tokens, minlength=3).float() / 3000
    assert torch.allclose(freq, probs, atol=0.04)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"), (dict(logprobs=99), "logprobs"), (dict(stop_token_ids=[10**9]), "stop_token_ids"),
])
def test_sampling_params_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad).validate(vocab_size=1000)


def run(text: str, params: SamplingParams, prompt: str = "Q: ") -> tuple[list[str], str, str | None]:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), params, {EOS})
    pieces, reason = [], None
    for t in tok.encode(text) + [EOS]:
        reason = detok.add(t)
        pieces.append(detok.pop_text())
        if reason:
            break
    return pieces, detok.text, reason


def test_utf8_is_never_split():
    text = "héllo 😀 世界!"
    pieces, full, reason = run(text, SamplingParams(max_tokens=100))
    assert "".join(pieces) == full == text and reason == "stop"
    assert all("\ufffd" not in p for p in pieces)
    assert "😀" in pieces  # the emoji's 4 tokens come out as one piece, on its last byte


def test_stop_string_cut_and_held_back():
    pieces, full, reason = run("abc STOP def", SamplingParams(max_tokens=100, stop=["STOP", "xyz"]))
    assert full == "abc " and "".join(pieces) == "abc " and reason == "stop"
    # 'S', 'ST', 'STO' could start a stop string: nothing of them was emitted before the decision
    assert not any("S" in p for p in pieces)


def test_stop_string_false_start_is_released():
    pieces, full, _ = run("a STAR b", SamplingParams(max_tokens=100, stop=["STOP"]))
    assert full == "a STAR b" and "".join(pieces) == full


def test_max_tokens_min_tokens_and_ignore_eos():
    _, full, reason = run("abcdef", SamplingParams(max_tokens=3))
    assert full == "abc" and reason == "length"
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=5, min_tokens=2), {EOS})
    assert detok.add(EOS) is None  # below min_tokens: EOS does not stop
    assert detok.add(ord("a")) is None
    assert detok.add(EOS) == "stop"
    detok = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=2, ignore_eos=True), {EOS})
    assert detok.add(EOS) is None and detok.add(EOS) == "length"


def test_stop_token_ids_are_not_in_the_text():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], SamplingParams(max_tokens=9, stop_token_ids=[ord("!")]), set())
    reasons = [detok.add(t) for t in tok.encode("hi!")]
    assert reasons == [None, None, "stop"] and detok.text == "hi"
