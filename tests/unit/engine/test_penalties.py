"""Presence, frequency and repetition penalties and logit_bias: exact arithmetic on fake logits, batched rows that
do not disturb each other, and validation of their ranges."""

from __future__ import annotations

import pytest
import torch

from crescent.engine.sampler import SampleRequest, apply_penalties, sample
from crescent.engine.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0])


def _one(params: SamplingParams, prompt=(), output=()) -> torch.Tensor:
    return apply_penalties(LOGITS.unsqueeze(0).clone(), [SampleRequest(params, len(output), prompt, output)])[0]


def test_frequency_and_presence_count_only_the_output():
    got = _one(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), prompt=[2, 2, 2], output=[0, 0, 1])
    want = LOGITS.clone()
    want[0] -= 2 * 0.5 + 1.0  # twice in the output
    want[1] -= 0.5 + 1.0
    assert torch.allclose(got, want)  # token 2 is only in the prompt: untouched


def test_negative_penalties_encourage_repeats():
    got = _one(SamplingParams(presence_penalty=-2.0), output=[3])
    assert got[3] == pytest.approx(2.0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    got = _one(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[4])
    assert got.tolist() == pytest.approx([1.0, -2.0, 0.5, 0.0, 1.5])


def test_logit_bias_adds_to_the_named_tokens():
    got = _one(SamplingParams(logit_bias={1: 100.0, 4: -100.0}))
    assert got[1] == pytest.approx(99.0) and got[4] == pytest.approx(-97.0)
    assert got[0] == LOGITS[0]


def test_rows_without_penalties_are_untouched_in_a_mixed_batch():
    logits = LOGITS.repeat(3, 1)
    reqs = [SampleRequest(SamplingParams(), 2, [0], [0, 4]),
            SampleRequest(SamplingParams(frequency_penalty=2.0), 2, [], [4, 4]),
            SampleRequest(SamplingParams(logit_bias={2: 5.0}), 0)]
    got = apply_penalties(logits, reqs)
    assert torch.equal(got[0], LOGITS)
    assert got[1, 4] == pytest.approx(-1.0) and got[1, 0] == LOGITS[0]
    assert got[2, 2] == pytest.approx(5.5)
    assert torch.equal(logits[1], LOGITS)  # the caller's tensor is not modified


def test_greedy_choice_follows_the_penalised_logits_but_logprobs_stay_the_models():
    logits = LOGITS.unsqueeze(0)
    plain = sample(logits, [SampleRequest(SamplingParams(temperature=0, logprobs=0), 1, [], [4])])
    assert plain[0] == [4]
    tokens, lps = sample(logits, [SampleRequest(SamplingParams(temperature=0, logprobs=0, presence_penalty=2.0),
                                                1, [], [4])])
    assert tokens == [0]  # 3 - 2 = 1 < 2
    assert lps[0][1] == pytest.approx(float(torch.log_softmax(LOGITS, -1)[0]))


def test_logit_bias_forces_a_token_under_random_sampling():
    logits = torch.randn(64, 5)
    reqs = [SampleRequest(SamplingParams(temperature=1.0, seed=3, logit_bias={3: 100.0}), i) for i in range(64)]
    assert set(sample(logits, reqs)[0]) == {3}


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                         ("repetition_penalty", 0.0), ("logit_bias", {7: 1.0}),
                                         ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0})])
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate(vocab_size=5)
