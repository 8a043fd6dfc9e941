"""The engine interface: crescent's AsyncEngine implements it (block hand-off), and the vLLM engine's pure parts
(parameter mapping, logprobs, engine arguments) map crescent's settings and requests as documented."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest

from crescent.engine.async_engine import AsyncEngine
from crescent.engine.interface import BlockKvEngine, Engine, StoreParams
from crescent.engine.sampling_params import SamplingParams
from crescent.engine.settings import VllmEngineSettings
from crescent.engine.vllm_engine import ConnectorSpec, cpu_thread_env, engine_args, vllm_block_size
from crescent.engine.vllm_params import logprobs_from_vllm, sampling_kwargs
from tests.unit.engine.helpers import make_engine, prompts, tiny_model


def test_async_engine_is_a_block_kv_engine():
    core = make_engine(tiny_model())
    engine = AsyncEngine(core).start()
    try:
        assert isinstance(engine, Engine) and isinstance(engine, BlockKvEngine)
        assert engine.kv_handoff == "blocks" and engine.model_id == "tiny" and engine.vocab_size == 257
        assert engine.kv_block_shape == (2, 2, 4, 2, 8) and engine.max_model_len == core.max_model_len
    finally:
        engine.shutdown()


def test_held_blocks_are_taken_once_and_then_cached():
    engine = AsyncEngine(make_engine(tiny_model())).start()
    prompt = prompts(1, seed=3, lo=18, hi=19)[0]
    params = SamplingParams(temperature=0, max_tokens=1)

    async def main():
        outs = [o async for o in engine.generate("p", prompt, params, hold_kv=True, store=StoreParams("ignored"))]
        hashes, blocks = await engine.take_held_blocks("p")
        assert outs[-1].finished and len(hashes) == len(blocks) == 18 // 4
        assert blocks[0].shape == engine.kv_block_shape and blocks[0].dtype == engine.kv_dtype
        assert await engine.cached_prefix_blocks(hashes) == len(hashes)  # released into the prefix cache
        with pytest.raises(KeyError):
            await engine.take_held_blocks("p")
        await engine.abort("unknown-id")  # ignored
        assert engine.latest_stats().running == 0

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        engine.shutdown()


def test_sampling_kwargs_map_every_field_and_count_forced_outputs():
    p = SamplingParams(temperature=0.5, top_p=0.9, top_k=-1, seed=7, max_tokens=10, min_tokens=3, stop=["\n"],
                       stop_token_ids=[5], ignore_eos=True, logprobs=2, presence_penalty=0.5,
                       frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={3: -100.0})
    kw = sampling_kwargs(p, num_forced=1)
    assert kw["max_tokens"] == 9 and kw["min_tokens"] == 2 and kw["top_k"] == 0 and kw["seed"] == 7
    assert kw["stop"] == ["\n"] and kw["stop_token_ids"] == [5] and kw["logprobs"] == 2 and kw["ignore_eos"]
    assert (kw["presence_penalty"], kw["frequency_penalty"], kw["repetition_penalty"]) == (0.5, -0.5, 1.2)
    assert kw["logit_bias"] == {3: -100.0} and kw["n"] == 1
    assert sampling_kwargs(SamplingParams())["stop"] is None


def test_sampling_kwargs_refuse_what_vllm_cannot_do_here():
    with pytest.raises(ValueError, match="response_format"):
        sampling_kwargs(SamplingParams(response_format='{"type": "json_object"}'))
    with pytest.raises(ValueError, match="max_tokens=1"):
        sampling_kwargs(SamplingParams(max_tokens=1), num_forced=1)


def test_logprobs_from_vllm_rank_the_top_and_keep_the_sampled():
    lp = SimpleNamespace
    positions = [{7: lp(logprob=-0.1, rank=1), 9: lp(logprob=-2.5, rank=2), 4: lp(logprob=-5.0, rank=40)}]
    out = logprobs_from_vllm([4, 8], positions, top_n=2)
    assert out[0] == (4, -5.0, [(7, -0.1), (9, -2.5)])
    assert out[1][0] == 8 and math.isnan(out[1][1]) and out[1][2] == []


def test_engine_args_follow_crescents_settings():
    s = VllmEngineSettings(dtype="float32", kv_block_size=16, max_model_len=2048, vllm_enforce_eager=True)
    args = engine_args(s, "/m", "m", ConnectorSpec("C", "mod.path", {"block_size": 16}), on_cpu=True)
    assert args["dtype"] == "float32" and args["block_size"] == 32 and args["max_model_len"] == 2048
    assert args["enable_prefix_caching"] and args["enforce_eager"] and args["disable_log_stats"]
    assert args["kv_transfer_config"] == {"kv_connector": "C", "kv_connector_module_path": "mod.path",
                                          "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                          "kv_connector_extra_config": {"block_size": 16}}
    assert "kv_transfer_config" not in engine_args(s, "/m", "m", None)
    assert "kv_events_config" not in args  # vLLM publishes its prefix cache's events only when asked to
    events = engine_args(s, "/m", "m", None, True, "ipc:///tmp/e")["kv_events_config"]
    assert events == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///tmp/e"}
    no_cache = s.model_copy(update={"enable_prefix_caching": False})
    assert "kv_events_config" not in engine_args(no_cache, "/m", "m", None, True, "ipc:///tmp/e")
    assert vllm_block_size(s, on_cpu=False) == 16
    assert vllm_block_size(s.model_copy(update={"vllm_block_size": 128}), on_cpu=True) == 128


def test_vllm_workers_on_cpu_take_their_share_of_the_cores_unpinned():
    # vLLM's "auto" binding pins every worker's threads to the same cores: the workers' forward passes then fight
    assert cpu_thread_env(1, {}) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    assert cpu_thread_env(4, {"PATH": "/bin"})["OMP_NUM_THREADS"] == "4"
    assert cpu_thread_env(0, {}) == {}  # no share given: vLLM's own choice
    assert cpu_thread_env(2, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) == {}  # the operator's binding wins


def test_store_params_are_the_connector_contract():
    params = StoreParams("127.0.0.1:1", "", "m", load=True).as_kv_transfer_params()
    assert params == {"kvstore_address": "127.0.0.1:1", "kvstore_transport": "tcp", "model_id": "m", "load": True,
                      "save": False}


def _vllm_output(ids, text, finished=False, reason=None, logprobs=None, cached=0, kv=None):
    """What vLLM's AsyncLLM yields in DELTA mode, reduced to the fields VllmEngine reads."""
    completion = SimpleNamespace(token_ids=ids, text=text, logprobs=logprobs, finish_reason=reason)
    return SimpleNamespace(outputs=[completion], finished=finished, num_cached_tokens=cached,
                           kv_transfer_params=kv)


def test_vllm_deltas_become_crescent_outputs_with_the_forced_token_first():
    from crescent.engine.detokenizer import IncrementalDetokenizer
    from crescent.engine.vllm_engine import _Stream
    from tests.unit.engine.byte_tokenizer import ByteTokenizer

    params = SamplingParams(temperature=0, max_tokens=8, stop=["xyz"], logprobs=1)
    detok = IncrementalDetokenizer(ByteTokenizer(), list(b"ab"), params)
    detok.add(ord("x"))  # prefill's first token: "x" could start the stop string, so its text is held back
    stream = _Stream("r", 2, params, [ord("x")], detok)
    lp = SimpleNamespace
    first = stream.convert(_vllm_output([ord("y")], "y", logprobs=[{ord("y"): lp(logprob=-0.5, rank=1)}]))
    assert first.new_token_ids == [ord("x"), ord("y")] and first.new_text == "xy" and not first.finished
    assert math.isnan(first.new_logprobs[0][1]) and first.new_logprobs[1] == (ord("y"), -0.5, [(ord("y"), -0.5)])
    last = stream.convert(_vllm_output([ord("!")], "!", True, "length", [{ord("!"): lp(logprob=-1.0, rank=1)}],
                                       cached=32, kv={"loaded_tokens": 32}))
    assert last.finished and last.finish_reason == "length" and last.completion_tokens == 3
    assert last.token_ids == [ord("x"), ord("y"), ord("!")] and last.text == "xy!"
    assert last.cached_tokens == 32 and last.kv_transfer_params == {"loaded_tokens": 32}
