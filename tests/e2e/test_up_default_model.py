"""`crescent up` with the default model (SmolLM2-135M-Instruct), end to end through the official openai client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from crescent.services.common.launcher import free_port, http_ok

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 240


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("up-logs")
    port = free_port()
    # the kvstore's SSD tier in a temp dir: not the user's ~/.cache (a `crescent up` of their own may hold it)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CRESCENT_TORCH_THREADS": "1", "CRESCENT_NUM_KV_BLOCKS": "512",
           "CRESCENT_DEVICE": "cpu", "CRESCENT_DATA_DIR": str(tmp_path_factory.mktemp("kvstore"))}
    proc = subprocess.Popen([sys.executable, "-m", "crescent.cli", "up", "--free-ports", "--port", str(port),
                             "--log-dir", str(log_dir), "--startup-timeout-s", str(STARTUP_S)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    healthy = http_ok(url + "/health")
    deadline = time.monotonic() + STARTUP_S + 30
    while not healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"crescent up did not come up: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_capital_of_france(gateway_url):
    client = openai.OpenAI(base_url=gateway_url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
        temperature=0)
    assert "Paris" in reply.choices[0].message.content
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
        temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
