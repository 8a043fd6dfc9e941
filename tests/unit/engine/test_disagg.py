"""Disaggregation through the engine API: a 'prefill' engine holds and exports KV blocks, a 'decode' engine imports
them and continues with the forced first token -- identical to one engine doing it all."""

from __future__ import annotations

import pytest
import torch

from crescent.engine.sampling_params import SamplingParams
from crescent.hashing import prefix_block_hashes
from tests.unit.engine.helpers import greedy_reference, make_engine, prompts, tiny_model

BS = 4


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def prefill(engine, rid: str, prompt: list[int], params: SamplingParams):
    """Run a request to its first token with hold_kv, return (first token, hashes, blocks)."""
    engine.add_request(rid, prompt, SamplingParams(**{**params.__dict__, "max_tokens": 1}), hold_kv=True)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    hashes, blocks = engine.export_request_blocks(rid)
    return outs[-1].token_ids[0], hashes, blocks


def test_export_import_gives_identical_output_and_prefix_hits(model):
    prompt = prompts(1, seed=5, lo=30, hi=31)[0]
    ref = greedy_reference(model, prompt, 8)
    first = make_engine(model)
    _, hashes, blocks = prefill(first, "p", prompt, SamplingParams(temperature=0))
    assert hashes == prefix_block_hashes(prompt, BS, "tiny")  # the cluster-wide block identity
    cfg = model.config
    assert blocks[0].shape == (cfg.num_hidden_layers, 2, BS, cfg.num_key_value_heads, cfg.head_dim)
    assert blocks[0].dtype == torch.float64 and blocks[0].is_contiguous()

    second = make_engine(model)
    assert second.cached_prefix_blocks(hashes) == 0
    assert second.import_blocks(hashes, blocks) == len(hashes) == 7
    assert second.import_blocks(hashes, blocks) == 0  # already cached
    assert second.cached_prefix_blocks(hashes) == 7
    out = second.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == ref and out.cached_tokens == 28
    assert second.stats().prefix_hit_tokens == 28 and second.stats().prefix_query_tokens == 30


def test_forced_first_token_continuation_equals_one_engine(model):
    prompt = prompts(1, seed=6, lo=21, hi=22)[0]
    for params in (SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                   SamplingParams(temperature=1.0, seed=11, max_tokens=9, ignore_eos=True)):
        whole = make_engine(model).generate([prompt], params)[0].token_ids
        p_engine, d_engine = make_engine(model), make_engine(model)
        token, hashes, blocks = prefill(p_engine, "r", prompt, params)
        assert token == whole[0]
        d_engine.add_request("r", prompt, params, forced_output_ids=[token], import_kv=(hashes, blocks))
        outs = []
        while d_engine.has_unfinished_requests():
            outs += d_engine.step()
        assert outs[0].new_token_ids[0] == token and outs[-1].completion_tokens == 9
        assert outs[-1].token_ids == whole and outs[-1].cached_tokens == 20


def test_held_blocks_release_and_export_from_cache(model):
    prompt = prompts(1, seed=7, lo=17, hi=18)[0]
    engine = make_engine(model)
    _, hashes, blocks = prefill(engine, "h", prompt, SamplingParams(temperature=0))
    held = engine.stats()
    assert held.free_blocks == held.total_blocks - 5  # 17 prompt tokens -> 5 blocks stay allocated
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("h", prompt, SamplingParams())
    engine.release("h")
    assert engine.stats().free_blocks == held.total_blocks
    with pytest.raises(KeyError):
        engine.export_request_blocks("h")
    cached = engine.export_blocks(hashes + [12345])
    assert cached[-1] is None and all(torch.equal(a, b) for a, b in zip(cached[:-1], blocks, strict=True))


def test_bad_imports_are_rejected_before_touching_the_cache(model):
    engine = make_engine(model)
    good = torch.zeros(2, 2, BS, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="hashes for"):
        engine.import_blocks([1, 2], [good])
    with pytest.raises(ValueError, match="does not fit"):
        engine.import_blocks([1, 2], [good, torch.zeros(3, 3)])
    assert engine.cached_prefix_blocks([1]) == 0


def test_import_stops_when_the_cache_is_full(model):
    engine = make_engine(model, num_kv_blocks=3)
    block = torch.zeros(2, 2, BS, 2, 8, dtype=torch.float64)
    assert engine.import_blocks([1, 2, 3, 4, 5], [block] * 5) == 3
    assert engine.cached_prefix_blocks([1, 2, 3, 4]) == 3


def test_held_blocks_that_pin_the_cache_stall_instead_of_spinning(model):
    engine = make_engine(model, num_kv_blocks=4)
    prefill(engine, "pin", list(range(12)), SamplingParams(temperature=0))  # 3 of 4 blocks held
    with pytest.raises(RuntimeError, match="release"):
        engine.generate([list(range(50, 62))], SamplingParams(temperature=0, max_tokens=2))
    assert engine.stalled
    engine.release("pin")
    engine.step()
    assert not engine.stalled
