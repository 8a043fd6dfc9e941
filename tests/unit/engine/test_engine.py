"""LLMEngine on a tiny random Llama: batched greedy equals a naive full-recompute loop under every scheduling path
(prefix hits, preemption, chunked prefill), seeds, request validation, stop conditions and logprobs."""

from __future__ import annotations

import pytest

from crescent.engine.sampling_params import SamplingParams
from tests.unit.engine.byte_tokenizer import ByteTokenizer
from tests.unit.engine.helpers import greedy_reference, make_engine, prompts, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch8(model):
    ps = prompts(8)
    return ps, [greedy_reference(model, p, GREEDY.max_tokens) for p in ps]


def test_batched_greedy_matches_naive_loop(model, batch8):
    ps, ref = batch8
    engine = make_engine(model)
    outs = engine.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" and o.completion_tokens == 10 for o in outs)
    assert [o.prompt_tokens for o in outs] == [len(p) for p in ps]
    stats = engine.stats()
    assert stats.running == stats.waiting == 0 and stats.free_blocks == stats.total_blocks


def test_prefix_cache_hit_gives_identical_output(model, batch8):
    ps, ref = batch8
    engine = make_engine(model)
    engine.generate([ps[0]], GREEDY)
    extended = ps[0] + [5, 6, 7, 8, 9]
    out = engine.generate([ps[0], extended], GREEDY)
    assert out[0].token_ids == ref[0]
    assert out[1].token_ids == greedy_reference(model, extended, 10)
    assert out[0].cached_tokens == (len(ps[0]) - 1) // 4 * 4 and out[1].cached_tokens >= out[0].cached_tokens
    assert engine.stats().prefix_hit_tokens == out[0].cached_tokens + out[1].cached_tokens


def test_preemption_gives_identical_output(model, batch8):
    ps, ref = batch8
    engine = make_engine(model, num_kv_blocks=24)  # ~ 2-3 sequences' worth of blocks for 8 sequences
    outs = engine.generate(ps, GREEDY)
    assert engine.stats().preemptions > 0
    assert [o.token_ids for o in outs] == ref


def test_chunked_prefill_gives_identical_output(model, batch8):
    ps, ref = batch8
    engine = make_engine(model, max_num_batched_tokens=7)
    outs = engine.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == ref


def test_seed_reproducible_alone_and_in_a_batch(model, batch8):
    ps, _ = batch8
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=8, ignore_eos=True)
    alone = make_engine(model).generate([ps[2]], mine)[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=5 + i, ignore_eos=True) for i in range(8)]
    others[2] = mine
    batched = make_engine(model).generate(ps, others)[2].token_ids
    assert alone == batched
    assert alone != make_engine(model).generate([ps[2]], SamplingParams(**{**mine.__dict__, "seed": 7}))[0].token_ids


def test_bad_requests_are_rejected_clearly(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("a", [1, 999], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("a", [1] * 300, GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("a", [1], SamplingParams(temperature=-1))
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1, 2], GREEDY)
    assert engine.abort_request("a").finish_reason == "abort"
    assert engine.stats().free_blocks == engine.stats().total_blocks and not engine.has_unfinished_requests()


def test_length_cap_of_the_model(model):
    engine = make_engine(model, max_model_len=20)
    out = engine.generate([list(range(15))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5


def test_stop_token_ids_and_logprobs(model, batch8):
    ps, ref = batch8
    engine = make_engine(model)
    stop_at = ref[0][3]
    first = ref[0].index(stop_at)
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at], logprobs=3, ignore_eos=True)
    engine.add_request("r", ps[0], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finish_reason == "stop" and outs[-1].token_ids == ref[0][:first + 1]
    lps = [lp for o in outs for lp in o.new_logprobs]
    assert [lp[0] for lp in lps] == ref[0][:first + 1]
    for tok, lp, top in lps:
        assert len(top) == 3 and top[0][0] == tok and top[0][1] == pytest.approx(lp) and lp <= 0


def test_text_stop_strings_and_utf8_through_forced_outputs(model):
    tok = ByteTokenizer()
    engine = make_engine(model, tokenizer=tok)
    text = "héllo 😀 世界 STOP tail"
    forced = tok.encode(text)
    engine.add_request("s", tok.encode("prompt"), SamplingParams(max_tokens=100, stop=["STOP"]),
                       forced_output_ids=forced)
    out = engine.step()[0]
    assert out.finished and out.finish_reason == "stop" and out.text == out.new_text == "héllo 😀 世界 "
    engine.add_request("u", tok.encode("p"), SamplingParams(temperature=0, max_tokens=len(forced) + 3),
                       forced_output_ids=tok.encode("😀世"))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    # forced outputs come first, whole characters, then the model's own (random bytes: any text at all)
    assert outs[0].new_token_ids[:7] == tok.encode("😀世") and outs[0].new_text.startswith("😀世")
    assert outs[-1].text == "".join(o.new_text for o in outs) and outs[-1].completion_tokens == len(forced) + 3


def test_step_observer_sees_every_forward(model):
    engine = make_engine(model)
    steps = []
    engine.step_observer = lambda kind, seconds, prompt, sampled: steps.append((kind, prompt, sampled))
    engine.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert sum(s[1] for s in steps) == 5 and sum(s[2] for s in steps) == 4


def test_aborts_while_waiting_and_mid_prefill_free_everything(model, batch8):
    ps, ref = batch8
    engine = make_engine(model, max_num_batched_tokens=8, max_num_seqs=2)
    for i in range(4):
        engine.add_request(f"r{i}", ps[i] + ps[i], GREEDY)
    engine.step()  # r0 mid-prefill (8 of its tokens), r2/r3 waiting
    assert engine.abort_request("r0").finish_reason == "abort"
    assert engine.abort_request("r3").finish_reason == "abort"
    assert engine.abort_request("nope") is None
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finals) == {"r1", "r2"}
    assert finals["r1"].token_ids == greedy_reference(model, ps[1] + ps[1], 10)
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks and stats.running == stats.waiting == 0


def test_identical_prompts_together_and_later_share_blocks(model, batch8):
    ps, ref = batch8
    engine = make_engine(model)
    outs = engine.generate([ps[4]] * 3, GREEDY)
    assert all(o.token_ids == ref[4] for o in outs)
    again = engine.generate([ps[4]], GREEDY)[0]
    assert again.token_ids == ref[4] and again.cached_tokens == (len(ps[4]) - 1) // 4 * 4
