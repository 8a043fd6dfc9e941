"""Run the gateway app under a real uvicorn server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from crescent.services.common.launcher import free_port
from crescent.services.gateway.server import create_app, uvicorn_config
from crescent.services.gateway.settings import GatewaySettings
from crescent.services.gateway.tokens import PromptEncoder

MODEL = "fake-model"


@contextmanager
def running_gateway(conductor_address: str, tokenizer, max_model_len: int = 200, ready_s: float = 10.0,
                    **settings) -> Iterator[str]:
    """Yields the base URL once /health says ready; stops the server (bounded) on exit."""
    port = free_port()
    config = GatewaySettings(host="127.0.0.1", port=port, log_level="warning", conductor_address=conductor_address,
                             served_model_name=MODEL, ready_poll_s=0.1, request_timeout_s=20, **settings)
    app = create_app(config, encoder=PromptEncoder(tokenizer, max_model_len=max_model_len))
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
