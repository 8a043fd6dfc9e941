"""The worker runtime's swap + drain of engines when a new published version arrives, and reload's refusals."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from crescent.engine.outputs import EngineStats
from crescent.proto.v1 import common_pb2
from crescent.services.common import metrics as m
from crescent.services.common.model_watch import ModelWatcher
from tests.unit.services.common.helpers import FakeValidate, make_versions


class _FakeLLMEngine:
    """What WorkerRuntime.install reads of an LLMEngine; never has work, so the engine thread just waits."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.block_manager = SimpleNamespace(num_blocks=4, block_size=16)

    def has_unfinished_requests(self) -> bool:
        return False

    def stats(self) -> EngineStats:
        return EngineStats(waiting=0, running=0, free_blocks=4, total_blocks=4, queued_prefill_tokens=0,
                           running_context_tokens=0, prefix_query_tokens=0, prefix_hit_tokens=0, preemptions=0)


async def _until_stopped(engine) -> None:
    """Wait (bounded: 2 s) for a retiring engine to shut down; the caller asserts that it did."""
    for _ in range(100):
        if not engine.running:
            return
        await asyncio.sleep(0.02)


def test_runtime_swap_drains_the_old_engine_then_retires_it(tmp_path):
    from crescent.services.worker.service import WorkerRuntime
    from crescent.services.worker.settings import WorkerServiceSettings

    v1, v2 = make_versions(tmp_path / "tiny", "v000001", "v000002")
    settings = WorkerServiceSettings(model=str(tmp_path / "tiny"), drain_timeout_s=5.0, reload_grace_s=0.0)
    rt = WorkerRuntime(settings, common_pb2.ROLE_DECODE)
    assert rt.watcher is not None and rt.watcher.name == "tiny"

    async def scenario() -> None:
        rt.watcher.accept(v1)
        rt.install(_FakeLLMEngine("tiny@v000001"))
        assert rt.instance_info(1234).model_id == "tiny" and rt.model_id == "tiny@v000001"
        async with rt.serving(None) as held:  # a request in flight on v1
            rt.watcher.accept(v2)
            rt.install(_FakeLLMEngine("tiny@v000002"))
            assert rt.engine is not held and rt.model_id == "tiny@v000002"
            assert rt.instance_info(1234).model_id == "tiny"  # the conductor's name is stable
            await asyncio.sleep(0.2)
            assert held.running and rt.users_of(held) == 1  # not shut down under its request
        await _until_stopped(held)  # the drain polls every 50 ms
        assert not held.running and rt.engine.running
        await rt.close_engines()
        assert not rt.engine.running

    asyncio.run(scenario())
    assert m.WORKER_MODEL_VERSION.labels("decode", "v000002")._value.get() == 1
    samples = [s for s in m.WORKER_MODEL_VERSION.collect()[0].samples if s.labels["role"] == "decode"]
    assert [s.labels["version"] for s in samples] == ["v000002"]


def test_reload_refuses_a_version_that_validates_but_does_not_load(tmp_path):
    """v2's manifest is right but its weights do not fit its config: refused, and v1 keeps serving."""
    import hashlib
    import json

    from crescent.services.worker.reload import load_first, reload_once
    from crescent.services.worker.service import WorkerRuntime
    from crescent.services.worker.settings import WorkerServiceSettings
    from crescent.training.pretrain import build_model, model_config
    from crescent.training.publish import publish_checkpoint
    from crescent.training.settings import ModelShapeSettings
    from crescent.training.tokenizer import IM_END, special_id, train_tokenizer

    tok = train_tokenizer(["hello world, the moon is bright"] * 10, vocab_size=280)

    def config_of(hidden: int):
        shape = ModelShapeSettings(hidden_size=hidden, intermediate_size=64, num_layers=1, num_heads=2,
                                   num_kv_heads=1, full_layers=[0])
        return model_config(shape, tok.get_vocab_size(), 64, special_id(tok, IM_END))

    small, wide = config_of(32), config_of(48)
    v1 = publish_checkpoint(build_model(small, 0, "cpu"), small, tok, tmp_path, "m", step=1, metrics={})
    v2 = publish_checkpoint(build_model(wide, 0, "cpu"), wide, tok, tmp_path, "m", step=2, metrics={})
    (v2 / "config.json").write_text((v1 / "config.json").read_text())  # 32-wide config, 48-wide weights
    manifest = json.loads((v2 / "manifest.json").read_text())
    data = (v2 / "config.json").read_bytes()
    manifest["files"]["config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    (v2.parent / "v000003").mkdir()  # not even a checkpoint: refused by validation

    settings = WorkerServiceSettings(model=str(tmp_path / "m"), device="cpu", num_kv_blocks=8, torch_threads=1)
    rt = WorkerRuntime(settings, common_pb2.ROLE_PREFILL)

    async def scenario() -> None:
        rt.install(await load_first(rt.settings, rt.watcher))  # v3 and v2 refused on the way: v1 serves
        assert rt.model_id == "m@v000001" and rt.engine.engine.model_id == "m@v000001"
        assert await reload_once(rt) is False  # both remembered: nothing to try
        await rt.close_engines()

    asyncio.run(scenario())
    assert set(rt.watcher.refused) == {"v000002", "v000003"}
    assert rt.watcher.refused["v000002"].startswith("does not load:")
    assert "incomplete" in rt.watcher.refused["v000003"]


def test_reload_out_of_memory_is_retried_not_refused(tmp_path, monkeypatch):
    from crescent.services.worker import reload as model_reload

    v1, v2 = make_versions(tmp_path, "v000001", "v000002")
    watcher = ModelWatcher(tmp_path, "m", validate=FakeValidate())
    watcher.accept(v1)
    installed = []
    runtime = SimpleNamespace(watcher=watcher, settings=None, install=installed.append)
    outcomes = iter([MemoryError("no room beside the serving engine"), "engine-v2"])

    def fake_build(settings, w, version):
        result = next(outcomes)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(model_reload, "build_engine", fake_build)
    assert asyncio.run(model_reload.reload_once(runtime)) is False
    assert watcher.refused == {} and watcher.version == "v000001"
    assert asyncio.run(model_reload.reload_once(runtime)) is True  # the next poll tries again
    assert installed == ["engine-v2"] and watcher.version == "v000002"


def test_decode_continues_a_request_on_the_version_prefill_used_while_it_is_loaded(tmp_path):
    """Prefill computed the prompt on v1; decode swapped to v2 before the request arrived: within the reload
    grace the request is served by v1 (its hash namespace and weights), after it by v2 (the prompt recomputed)."""
    from crescent.services.worker.service import WorkerRuntime
    from crescent.services.worker.settings import WorkerServiceSettings

    v1, v2 = make_versions(tmp_path / "tiny", "v000001", "v000002")
    settings = WorkerServiceSettings(model=str(tmp_path / "tiny"), drain_timeout_s=5.0, reload_grace_s=0.3)
    rt = WorkerRuntime(settings, common_pb2.ROLE_DECODE)

    async def scenario() -> None:
        rt.watcher.accept(v1)
        rt.install(_FakeLLMEngine("tiny@v000001"))
        first = rt.engine
        rt.watcher.accept(v2)
        rt.install(_FakeLLMEngine("tiny@v000002"))  # no request holds v1: only the grace keeps it loaded
        async with rt.serving(None, "tiny@v000001") as held:
            assert held is first and held.running
            async with rt.serving(None, "tiny@v000002") as other, rt.serving(None, "") as plain:
                assert other is rt.engine and plain is rt.engine
            await asyncio.sleep(0.5)  # past the grace: v1 still serves the request that holds it
            assert held.running and rt.users_of(held) == 1
        await _until_stopped(first)  # the retirement polls every 50 ms
        assert not first.running
        async with rt.serving(None, "tiny@v000001") as late:  # v1 is gone: the current version serves
            assert late is rt.engine
        await rt.close_engines()

    asyncio.run(scenario())


def test_prefill_retires_a_replaced_version_without_the_decode_grace(tmp_path):
    """Requests reach prefill unpinned, so its replaced engine goes as soon as it is idle."""
    from crescent.services.worker.service import WorkerRuntime
    from crescent.services.worker.settings import WorkerServiceSettings

    v1, v2 = make_versions(tmp_path / "tiny", "v000001", "v000002")
    settings = WorkerServiceSettings(model=str(tmp_path / "tiny"), drain_timeout_s=30.0, reload_grace_s=30.0)
    rt = WorkerRuntime(settings, common_pb2.ROLE_PREFILL)

    async def scenario() -> None:
        rt.watcher.accept(v1)
        rt.install(_FakeLLMEngine("tiny@v000001"))
        first = rt.engine
        rt.watcher.accept(v2)
        rt.install(_FakeLLMEngine("tiny@v000002"))
        await _until_stopped(first)  # well under the 30 s grace
        assert not first.running and rt.engine.running
        await rt.close_engines()

    asyncio.run(scenario())
