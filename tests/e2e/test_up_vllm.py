"""`crescent up --engine vllm --mode agg` end to end through the official openai client: streaming, n, stop,
logprobs, errors, and greedy output token for token equal to `vllm.LLM.generate` on the same prompt.

One cluster for the module; the reference (vllm.LLM in a subprocess of .venv-vllm) starts beside it, so the two
vLLM start-ups overlap. Skips when there is no Python with vLLM (`make vllm` makes .venv-vllm).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import openai
import pytest

from crescent.services.common.launcher import free_port, http_ok
from tests.e2e.vllm_helpers import (
    MAX_MODEL_LEN,
    REPO,
    assert_greedy_equal,
    prompts,
    reference_outputs,
    start_reference,
    stop_up_and_reference,
    tail,
    vllm_python_or_skip,
)

STARTUP_S = 300
# vLLM's start-up on 2 shared cores is minutes (deploy/vllm/README.md); the first test's timeout counts the fixture
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    python = vllm_python_or_skip()
    tmp = tmp_path_factory.mktemp("up-vllm")
    token_prompts = prompts([(0, 120), (1000, 1600), (2000, 3400)])
    env = {**os.environ, "PYTHONPATH": str(REPO), "CRESCENT_REJECTION": "none", "CRESCENT_DEVICE": "cpu",
           "CRESCENT_DTYPE": "float32", "CRESCENT_VLLM_KV_CACHE_GIB": "1",
           "CRESCENT_DATA_DIR": str(tmp / "kvstore"), "CRESCENT_VLLM_PYTHON": python,
           # the OpenAI surface of a vLLM worker; the store through CrescentConnector is test_up_vllm_disagg's
           "CRESCENT_VLLM_KV_CONNECTOR": "none"}
    reference = start_reference(python, tmp, token_prompts, env)  # overlaps with the cluster's start-up
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "crescent.cli", "up", "--engine", "vllm", "--mode", "agg",
                             "--free-ports", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
                             "--log-dir", str(tmp / "logs"), "--startup-timeout-s", str(STARTUP_S)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    healthy = http_ok(url + "/health")
    deadline = time.monotonic() + STARTUP_S + 30
    try:
        while not healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"crescent up --engine vllm did not come up: {proc.stdout.read() if proc.stdout else ''}"
                            f"\n{tail(tmp / 'logs' / 'worker-0.log')}")
            time.sleep(0.5)
        print(f"crescent up --engine vllm --mode agg healthy after {time.monotonic() - started:.0f} s")
        yield {"url": url, "prompts": token_prompts, "reference": reference, "tmp": tmp}
    finally:
        stop_up_and_reference(proc, reference)


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_streams_what_it_answers_whole(client, model):
    whole = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([c for c in chunks if c]) > 1  # tokens arrive as they are generated, not at the end
    assert "".join(chunks) == whole.choices[0].message.content and "Paris" in whole.choices[0].message.content
    assert whole.usage.completion_tokens == 20 or whole.choices[0].finish_reason == "stop"


def test_n_choices_and_stop(client, model):
    reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, n=2,
                                      temperature=1.0, seed=3)
    assert sorted(c.index for c in reply.choices) == [0, 1] and all(c.text for c in reply.choices)
    free = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    cut = free.choices[0].text.find(" 6")
    assert cut > 0, free.choices[0].text
    stopped = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                        stop=[" 6"])
    assert stopped.choices[0].text == free.choices[0].text[:cut] and stopped.choices[0].finish_reason == "stop"


def test_logprobs(client, model):
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= 0.0 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-3)


def test_errors_are_openai_errors(client, model):
    with pytest.raises(openai.BadRequestError, match="response_format"):  # refused by the vLLM worker, as a 400
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4,
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=[0] * (MAX_MODEL_LEN + 10), max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)


def test_greedy_equals_vllm_llm_generate(up, client, model):
    assert_greedy_equal(client, model, up["prompts"], reference_outputs(up["reference"], up["tmp"], STARTUP_S))
