"""`crescent up --engine vllm --mode agg` end to end through the official openai client: streaming, n, stop,
logprobs, errors, and greedy output token for token equal to `vllm.LLM.generate` on the same prompt.

One cluster for the module; the reference (vllm.LLM in a subprocess of .venv-vllm) starts beside it, so the two
vLLM start-ups overlap. Skips when there is no Python with vLLM (`make vllm` makes .venv-vllm).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from crescent.services.common.launcher import free_port, http_ok, vllm_python

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 300
MAX_MODEL_LEN = 2048
GREEDY_TOKENS = 12


def _vllm_python() -> str:
    try:
        return vllm_python(os.environ.get("CRESCENT_VLLM_PYTHON", ""), (REPO,))
    except ValueError as exc:
        pytest.skip(f"no Python with vLLM: {exc}")


def _prompts() -> list[list[int]]:
    """Three prompts of about 120, 600 and 1400 tokens: stdlib source text through the served model's tokenizer."""
    import json as json_module

    from crescent.models.prepare import prepare_model
    from crescent.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(Path(prepare_model("default")))
    ids = tok.encode(inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder))
    return [ids[:120], ids[1000:1600], ids[2000:3400]]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    python = _vllm_python()
    tmp = tmp_path_factory.mktemp("up-vllm")
    prompts = _prompts()
    from crescent.models.prepare import prepare_model

    spec = {"model": str(prepare_model("default")), "prompts": prompts, "max_tokens": GREEDY_TOKENS,
            "engine": {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "block_size": 32,
                       "enable_prefix_caching": True, "enforce_eager": True}}
    (tmp / "ref-in.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CRESCENT_REJECTION": "none", "CRESCENT_DEVICE": "cpu",
           "CRESCENT_DTYPE": "float32", "CRESCENT_VLLM_KV_CACHE_GIB": "1",
           "CRESCENT_DATA_DIR": str(tmp / "kvstore"), "CRESCENT_VLLM_PYTHON": python}
    reference = subprocess.Popen([python, str(REPO / "tests/e2e/vllm_reference.py"), str(tmp / "ref-in.json"),
                                  str(tmp / "ref-out.json")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(tmp / "reference.log", "wb"), start_new_session=True)  # noqa: SIM115
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
                            f"\n{_tail(tmp / 'logs' / 'worker-0.log')}")
            time.sleep(0.5)
        print(f"crescent up --engine vllm --mode agg healthy after {time.monotonic() - started:.0f} s")
        yield {"url": url, "prompts": prompts, "reference": reference, "ref_out": tmp / "ref-out.json", "tmp": tmp}
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT if p is proc else signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            for p in (proc, reference):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} missing)"


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
    try:
        up["reference"].wait(timeout=STARTUP_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the vllm.LLM reference did not finish in time")
    assert up["reference"].returncode == 0, _tail(up["tmp"] / "reference.log")
    reference = json.loads(up["ref_out"].read_text())
    print(f"vllm.LLM (reference) built in {reference['load_s']:.0f} s")
    for prompt, ref in zip(up["prompts"], reference["outputs"], strict=True):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0,
                                          logprobs=0)
        choice = reply.choices[0]
        assert choice.text == ref["text"], f"prompt of {len(prompt)} tokens"
        assert reply.usage.completion_tokens == len(ref["token_ids"])
        assert len(choice.logprobs.tokens) == len(ref["token_ids"])
