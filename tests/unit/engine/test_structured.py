"""Structured outputs in the engine: a tiny random model (the hardest case: it has no idea what JSON is) with the
SmolLM2 tokenizer, constrained by xgrammar, always produces JSON that the schema accepts; forced outputs (a prefill
worker's first token) advance the grammar; bad schemas are a ValueError naming response_format."""

from __future__ import annotations

import json

import jsonschema
import pytest

from crescent.engine.llm_engine import LLMEngine
from crescent.engine.sampling_params import SamplingParams
from crescent.engine.settings import EngineSettings

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "pet": {"enum": ["cat", "dog"]},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
FORMAT = json.dumps({"type": "json_schema", "schema": SCHEMA})


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    from crescent.models.loader import load_model
    from crescent.models.prepare import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", layers=1, hidden=32)
    model, tokenizer, _ = load_model(folder)
    return LLMEngine(model, tokenizer, EngineSettings(model=str(folder), kv_block_size=16, num_kv_blocks=64,
                                                      max_num_seqs=8))


def _prompt(engine: LLMEngine) -> list[int]:
    return engine.tokenizer.encode("Describe a person as JSON:")


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_random_model_output_is_valid_json_for_the_schema(engine, temperature):
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=120, response_format=FORMAT)
              for i in range(3)]
    outs = engine.generate([_prompt(engine)] * 3, params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_gives_an_object_and_logit_bias_cannot_break_it(engine):
    """A free-form object never closes by chance under a random model: bias the ending tokens. The grammar still
    wins over the bias: a top-biased '"}' can only come once a key is open and a value closed."""
    enc = engine.tokenizer.encode
    bias = {enc('"}')[0]: 100.0, enc('{"')[0]: 100.0}
    out = engine.generate([_prompt(engine)], SamplingParams(temperature=0.0, max_tokens=60, logit_bias=bias,
                                                            response_format='{"type": "json_object"}'))[0]
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


def test_forced_first_token_continues_the_same_grammar(engine):
    """A decode worker receives prefill's first token as forced output: the matcher starts after it."""
    params = SamplingParams(temperature=0.0, max_tokens=120, response_format=FORMAT)
    whole = engine.generate([_prompt(engine)], params)[0]
    engine.add_request("continued", _prompt(engine), SamplingParams(temperature=0.0, max_tokens=120,
                                                                     response_format=FORMAT),
                       forced_output_ids=whole.token_ids[:1])
    final = None
    while final is None:
        final = next((o for o in engine.step() if o.finished), None)
    assert final.token_ids == whole.token_ids and final.text == whole.text


def test_a_forced_token_the_grammar_forbids_is_a_value_error(engine):
    bad = engine.tokenizer.encode("hello")[:1]
    with pytest.raises(ValueError, match="response_format"):
        engine.add_request("bad-forced", _prompt(engine), SamplingParams(response_format=FORMAT),
                           forced_output_ids=bad)
    assert "bad-forced" not in engine.requests


@pytest.mark.parametrize("fmt", ["not json", '{"type": "xml"}', '{"type": "json_schema", "schema": 3}',
                                 json.dumps({"type": "json_schema", "schema": {"type": "nonsense"}})])
def test_bad_response_formats_are_value_errors(engine, fmt):
    with pytest.raises(ValueError, match="response_format"):
        engine.add_request("bad-format", _prompt(engine), SamplingParams(response_format=fmt))


def test_compiled_grammars_are_cached(engine):
    assert engine.grammars.compile(FORMAT) is engine.grammars.compile(FORMAT)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_a_resumed_stream_continues_the_grammar_penalties_and_seed(engine, temperature):
    """The gateway resumes a choice whose worker died with prompt + tokens sent and prior_outputs = how many: the
    continuation is exactly the rest of the undisturbed output."""
    def params(prior: int = 0) -> SamplingParams:
        return SamplingParams(temperature=temperature, seed=11, max_tokens=120 - prior, response_format=FORMAT,
                              frequency_penalty=0.7, prior_outputs=prior)
    whole = engine.generate([_prompt(engine)], params())[0]
    k = 5
    rest = engine.generate([_prompt(engine) + whole.token_ids[:k]], params(k))[0]
    assert rest.token_ids == whole.token_ids[k:]
    jsonschema.validate(json.loads(whole.text), SCHEMA)


def test_prior_outputs_must_leave_a_prompt(engine):
    with pytest.raises(ValueError, match="prior_outputs"):
        engine.add_request("all-prior", [1, 2], SamplingParams(prior_outputs=2))
