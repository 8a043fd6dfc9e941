"""Hot reload on a real cluster: workers and gateway serve a published model directory, a stream in flight when v2
is published finishes on v1, the next request is served by v2, and a corrupt v3 is refused while v2 keeps serving."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.real_cluster import REPO, WORKER_FLAGS, logs_tail, scrape

NAME = "tiny-pub"
POLL_S = 0.3
STREAM_TOKENS = 900  # long enough to still be streaming when v2 is loaded and swapped in


@pytest.fixture(scope="module")
def tiny_parts():
    from crescent.training.pretrain import model_config
    from crescent.training.settings import ModelShapeSettings
    from crescent.training.tokenizer import IM_END, special_id, train_tokenizer

    tok = train_tokenizer(["The moon is bright tonight. Tell me about the sea and the stars."] * 20,
                          vocab_size=300)
    shape = ModelShapeSettings(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                               attention="full", full_layers=[0, 1])
    return model_config(shape, tok.get_vocab_size(), 1024, special_id(tok, IM_END)), tok


def _publish(parts, model_dir: Path, step: int) -> Path:
    """Version ``step`` of NAME, with weights seeded by the step (so each version answers differently)."""
    from crescent.training.pretrain import build_model
    from crescent.training.publish import publish_checkpoint

    config, tok = parts
    return publish_checkpoint(build_model(config, seed=step, device="cpu"), config, tok, model_dir, NAME, step,
                              metrics={"seed": step})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_parts):
    from crescent.services.common.launcher import free_port, plan_local_cluster, start_cluster

    tmp = tmp_path_factory.mktemp("hot_reload")
    _publish(tiny_parts, tmp / "models", 1)
    workers = {**WORKER_FLAGS, "model_watch_interval_s": POLL_S, "drain_timeout_s": 120}
    extra = {"prefill": workers, "decode": workers,
             "conductor": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0, "rejection": "none"},
             "kvstore": {"dram_capacity_bytes": 32 << 20, "ssd_capacity_bytes": 0, "data_dir": str(tmp / "ssd"),
                         "heartbeat_interval_s": 0.5},
             "gateway": {"ready_poll_s": 0.2, "request_timeout_s": 120, "model_watch_interval_s": POLL_S}}
    plan = plan_local_cluster(str(tmp / "models" / NAME), NAME, gateway_port=free_port(), free_ports=True,
                              extra=extra)
    env = {"PYTHONPATH": str(REPO), "CRESCENT_LOG_LEVEL": "info"}
    env.update({k: "" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    group = start_cluster(plan, tmp / "logs", env, timeout_s=180)
    yield plan, tmp
    group.stop()


def _worker_metrics(plan) -> dict[str, str]:
    return {p.role: f"http://127.0.0.1:{p.metrics_port}/metrics" for p in plan.processes
            if p.role in ("prefill", "decode")}


def _serving(plan, version: str) -> bool:
    urls = _worker_metrics(plan)
    return all(scrape([url], "crescent_worker_model_version_info", {"version": version}) == 1
               for url in urls.values())


def _wait(condition, what: str, tmp: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n{logs_tail(tmp)}")


def _greedy(client) -> list[float]:
    """The greedy answer's token logprobs: random tiny models often repeat one token whatever their seed, but
    their probabilities differ."""
    reply = client.completions.create(model=NAME, prompt="The moon is", max_tokens=8, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 8
    return reply.choices[0].logprobs.token_logprobs


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b, strict=True))


def _model_card(plan) -> dict:
    return httpx.get(plan.gateway_url + "/v1/models", timeout=10, trust_env=False).json()["data"][0]


def test_reload_while_streaming_then_refuse_a_broken_version(cluster, tiny_parts):
    plan, tmp = cluster
    client = openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]
    card = _model_card(plan)
    assert card["version"] == "v000001" and card["versions"] == ["v000001"]
    assert _serving(plan, "v000001")
    v1 = _greedy(client)

    # A long stream is in flight on v1 when v2 is published: it must finish, whole, while v2 takes new requests.
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me a story"}],
                                            max_tokens=STREAM_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks, swapped_mid_stream, published = [], False, False
    for chunk in stream:
        chunks.append(chunk)
        # Publish once a token has arrived, i.e. once decode holds the stream on v1 (the opening role chunk
        # comes from the gateway before decode has the request, and decode could swap before it arrives).
        if not published and chunk.choices and chunk.choices[0].delta.content:
            _publish(tiny_parts, tmp / "models", 2)
            published = True
        elif len(chunks) % 10 == 0 and not swapped_mid_stream:
            swapped_mid_stream = _serving(plan, "v000002")
    assert chunks[-1].usage.completion_tokens == STREAM_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert swapped_mid_stream, f"v2 was not swapped in while the stream ran\n{logs_tail(tmp)}"

    _wait(lambda: _model_card(plan)["version"] == "v000002", "the gateway to follow v000002", tmp)
    v2 = _greedy(client)
    assert not _same(v2, v1), (v1, v2)  # differently seeded weights answer differently
    assert _same(_greedy(client), v2)
    assert "draining" in (tmp / "logs" / "decode-0.log").read_text()  # the stream held the old engine

    # v3 appears atomically (renamed into place) but its weights do not match the manifest's sha256.
    bad = _publish(tiny_parts, tmp / "staging", 3)
    with (bad / "model.safetensors").open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    shutil.move(str(bad), str(tmp / "models" / NAME / "v000003"))
    logs = {role: tmp / "logs" / f"{role}-0.log" for role in ("prefill", "decode")}

    def refused() -> bool:
        return all("refused version v000003" in p.read_text() for p in logs.values()) and \
            "v000003" in _model_card(plan)["refused_versions"]

    _wait(refused, "v000003 to be refused everywhere", tmp)
    time.sleep(POLL_S * 5)  # several more polls: the refusal is remembered, not repeated
    for role, path in logs.items():
        lines = [ln for ln in path.read_text().splitlines() if "refused version v000003" in ln]
        assert len(lines) == 1 and "sha256" in lines[0] and "v000002" in lines[0], (role, lines)
    assert _serving(plan, "v000002") and _model_card(plan)["version"] == "v000002"
    assert _same(_greedy(client), v2)
