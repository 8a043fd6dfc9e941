"""The chart's Hugging Face init container script (helm/crescent/files/hf_download.py), run as a real process
against a stand-in Hub on loopback: the Hub's model API and `resolve` URLs, with large files redirected to a second
host (the CDN), as huggingface.co does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.unit.deploy.scripts import REPO

SCRIPT = REPO / "helm" / "crescent" / "files" / "hf_download.py"
MODEL = "org/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
         "model.safetensors": b"\x00" * 4096, "pytorch_model.bin": b"unwanted", "README.md": b"# readme"}
TOKEN = "hf_secret"


class Hub:
    """Two loopback HTTP servers: the Hub (API + resolve) and a CDN the Hub redirects .safetensors files to."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        self.hub, self.cdn = self._serve(self._hub_get), self._serve(self._cdn_get)

    def _serve(self, get) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                hub.requests.append((self.server.server_port, self.path, self.headers.get("Authorization")))
                status, headers, body = get(self.path)
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def url(self, server: ThreadingHTTPServer) -> str:
        return f"http://127.0.0.1:{server.server_port}"

    def _hub_get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        if path == f"/api/models/{MODEL}/revision/main":
            info = {"id": MODEL, "sha": COMMIT, "siblings": [{"rfilename": n} for n in self.files]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        prefix = f"/{MODEL}/resolve/{COMMIT}/"
        if path.startswith(prefix) and path[len(prefix):] in self.files:
            name = path[len(prefix):]
            if name.endswith(".safetensors"):
                return 302, {"Location": f"{self.url(self.cdn)}/blobs/{name}?signature=x"}, b""
            return 200, {}, self.files[name]
        return 404, {}, b"not found"

    def _cdn_get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        name = path.split("?")[0].removeprefix("/blobs/")
        return (200, {}, self.files[name]) if name in self.files else (404, {}, b"")

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


@pytest.fixture
def hub() -> Iterator[Hub]:
    server = Hub(FILES)
    yield server
    server.close()


def run(hub: Hub, dest: Path, files: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_MODEL_ID": MODEL, "HF_REVISION": "main", "HF_ENDPOINT": hub.url(hub.hub),
           "HF_TOKEN": TOKEN, "HF_DEST": str(dest),
           "HF_FILES": json.dumps(files or ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_downloads_the_matching_files_of_the_revisions_commit(hub, tmp_path):
    dest = tmp_path / "models" / "org--tiny-model"
    dest.parent.mkdir()
    result = run(hub, dest)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == [".crescent-complete", "config.json", "model.safetensors",
                                                      "tokenizer.json"]
    assert (dest / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert (dest / ".crescent-complete").read_text().strip() == COMMIT
    assert not (tmp_path / "models" / "org--tiny-model.partial").exists()
    hub_port, cdn_port = hub.hub.server_port, hub.cdn.server_port
    assert all(auth == f"Bearer {TOKEN}" for port, _, auth in hub.requests if port == hub_port)
    cdn = [auth for port, _, auth in hub.requests if port == cdn_port]
    assert cdn == [None], "the token must not follow the redirect to another host"


def test_a_complete_folder_for_the_same_commit_is_reused(hub, tmp_path):
    dest = tmp_path / "m"
    assert run(hub, dest).returncode == 0
    hub.requests.clear()
    again = run(hub, dest)
    assert again.returncode == 0 and "already holds" in again.stdout
    assert [path for _, path, _ in hub.requests] == [f"/api/models/{MODEL}/revision/main"]


def test_a_repository_without_safetensors_is_refused(hub, tmp_path):
    result = run(hub, tmp_path / "m", files=["*.json", "*.bin"])
    assert result.returncode != 0
    assert "no config.json and *.safetensors" in result.stderr
    assert not (tmp_path / "m").exists()
