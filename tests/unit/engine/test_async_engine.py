"""AsyncEngine: streaming, cancellation frees blocks, call() between steps, failures stay per request, idle sleep."""

from __future__ import annotations

import asyncio
import time

import pytest

from crescent.engine.async_engine import AsyncEngine, EngineError
from crescent.engine.sampling_params import SamplingParams
from tests.unit.engine.helpers import make_engine, prompts, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture()
def aengine():
    engine = AsyncEngine(make_engine(tiny_model())).start()
    yield engine
    engine.shutdown()


async def collect(aengine, rid, prompt, params=GREEDY, **kw):
    return [o async for o in aengine.generate(rid, prompt, params, **kw)]


def test_streams_match_the_sync_engine(aengine):
    ps = prompts(3, seed=9)
    expected = make_engine(tiny_model()).generate(ps, GREEDY)

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(collect(aengine, f"r{i}", p) for i, p in enumerate(ps))), 30)

    streams = asyncio.run(main())
    for outs, exp in zip(streams, expected, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == exp.token_ids
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_cancel_aborts_and_frees_blocks(aengine):
    async def main():
        total = (await aengine.call(lambda e: e.stats())).total_blocks
        seen = []

        async def consume():
            async for out in aengine.generate("long", list(range(30)), SamplingParams(max_tokens=200, ignore_eos=True)):
                seen.append(out)

        task = asyncio.create_task(consume())
        for _ in range(200):  # bounded wait for the stream to start
            if seen:
                break
            await asyncio.sleep(0.01)
        assert (await aengine.call(lambda e: e.stats())).free_blocks < total
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            stats = await aengine.call(lambda e: e.stats())
            if stats.free_blocks == total and stats.running == 0:
                break
            await asyncio.sleep(0.01)
        return seen, stats, total, await aengine.call(lambda e: e.has_unfinished_requests())

    seen, stats, total, unfinished = asyncio.run(asyncio.wait_for(main(), 30))
    assert seen and not seen[-1].finished
    assert stats.free_blocks == total and stats.running == stats.waiting == 0 and not unfinished


def test_breaking_out_of_the_iterator_aborts(aengine):
    async def main():
        gen = aengine.generate("b", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(200):
            if not await aengine.call(lambda e: e.has_unfinished_requests()):
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(asyncio.wait_for(main(), 30))


def test_call_runs_in_the_engine_thread_and_raises(aengine):
    async def main():
        name = await aengine.call(lambda e: __import__("threading").current_thread().name)
        with pytest.raises(KeyError):
            await aengine.call(lambda e: e.export_request_blocks("nope"))
        with pytest.raises(ValueError, match="empty"):
            await collect(aengine, "x", [])
        return name

    assert asyncio.run(asyncio.wait_for(main(), 30)) == "crescent-engine"


def test_a_failing_step_fails_only_its_requests(aengine):
    runner = aengine.engine.runner
    real_run = runner.run

    def flaky_run(batch):
        if any(item.seq.request_id == "bad" for item in batch.seqs):
            raise RuntimeError("injected failure")
        return real_run(batch)

    runner.run = flaky_run

    async def main():
        with pytest.raises(EngineError, match="injected failure"):
            await collect(aengine, "bad", [4, 5, 6])
        return await collect(aengine, "good", [4, 5, 6])  # the loop is alive and serves the next request

    outs = asyncio.run(asyncio.wait_for(main(), 30))
    assert outs[-1].finished and outs[-1].completion_tokens == 6
    assert aengine.running


def test_idle_loop_sleeps(aengine):
    time.sleep(0.05)
    start = time.thread_time()
    t0 = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - t0 < 0.1  # a busy-waiting loop would burn ~0.3 s of CPU here
    assert time.thread_time() - start < 0.05


def test_latest_stats_answers_during_a_long_step():
    """Heartbeats read the last snapshot: a step that takes seconds (a long prefill) never delays them."""
    engine = make_engine(tiny_model())
    gate = __import__("threading").Event()
    forward = engine.runner.run

    def slow_run(batch):
        gate.wait(10)  # the step blocks until the test has read the stats
        return forward(batch)

    engine.runner.run = slow_run
    aengine = AsyncEngine(engine).start()
    try:
        async def main():
            task = asyncio.create_task(collect(aengine, "r0", prompts(1, seed=3)[0]))
            deadline = time.monotonic() + 5
            while aengine.latest_stats().waiting + aengine.latest_stats().running == 0:
                assert time.monotonic() < deadline, "the request never showed in the snapshot"
                await asyncio.sleep(0.01)
            started = time.monotonic()
            stats = aengine.latest_stats()  # the step is blocked in slow_run now
            assert time.monotonic() - started < 0.05 and stats.waiting + stats.running == 1
            gate.set()
            return await asyncio.wait_for(task, 30)

        outs = asyncio.run(main())
        assert outs[-1].finished and aengine.latest_stats().running == 0
    finally:
        gate.set()
        aengine.shutdown()


def test_a_consumer_that_falls_behind_gets_the_queued_steps_in_one_output(aengine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompt = prompts(1, seed=4)[0]
    expected = make_engine(tiny_model()).generate([prompt], params)[0]

    async def main():
        outs = []
        async for out in aengine.generate("slow", prompt, params):
            outs.append(out)
            time.sleep(0.2)  # blocks the event loop, as a busy one would: the engine keeps stepping meanwhile
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), 60))
    assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
    assert sum(len(o.new_logprobs) for o in outs) == len(expected.token_ids)
    assert len(outs) < len(expected.token_ids)  # steps were merged, none lost
    assert outs[-1].finished and outs[-1].token_ids == expected.token_ids
    assert not any(o.token_ids for o in outs[:-1])  # the whole output is built once, at the end
