"""A conductor whose Redis has a password, TLS, and outages: it keeps serving from its own state while Redis is
gone and writes that state back when Redis returns (a real redis-server, killed and restarted empty)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import common_pb2, conductor_pb2
from crescent.services.conductor.cluster import InstanceInfo, Load, Role, Tier
from crescent.services.conductor.kv_index import KvEventKind
from crescent.services.conductor.mirrored_state import mirrored_state
from crescent.services.conductor.redis_state import connect

from .conductor_client import free_port, register, stub, wait_until

REDIS = shutil.which("redis-server")
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server binary not installed (apt-get install redis-server)")
REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-pass"


class RedisServer:
    """A redis-server process on a fixed port that a test can kill -9 and start again (empty: no persistence)."""

    def __init__(self, extra: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self, client_factory) -> None:
        self.proc = subprocess.Popen([REDIS, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = client_factory()

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:  # not listening yet
                return False
        try:
            wait_until(answers, timeout_s=10.0, what="redis-server to answer PING")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def password_redis():
    server = RedisServer([])
    server.extra = ["--port", str(server.port), "--requirepass", PASSWORD]
    url = f"redis://127.0.0.1:{server.port}/0"
    server.start(lambda: connect(url, PASSWORD, timeout_s=0.5))
    yield server, url
    server.stop()


def test_a_password_is_required_and_used(password_redis):
    _, url = password_redis
    with pytest.raises(redis.AuthenticationError):
        connect(url, timeout_s=0.5).ping()
    with pytest.raises(redis.AuthenticationError):
        connect(url, "wrong", timeout_s=0.5).ping()
    assert connect(url, PASSWORD, timeout_s=0.5).ping()


def test_state_survives_a_redis_outage_and_is_written_back(password_redis):
    server, url = password_redis
    client = connect(url, PASSWORD, timeout_s=0.5)
    registry, index, link = mirrored_state(client, heartbeat_timeout_s=30.0, ns="t", retry_s=0.2)
    hashes = prefix_block_hashes(list(range(64)), 16, "m")
    registry.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.1:1"), Load(), 100.0)
    index.apply("p0", KvEventKind.STORED, hashes, Tier.DEVICE)
    assert [s.instance_id for s in registry.instances()] == ["p0"]

    server.kill()
    # Redis is gone: every call still answers, from this replica's own state
    registry.register(InstanceInfo("d0", Role.DECODE, address="10.0.0.2:1"), Load(), 101.0)
    assert link.up is False
    assert registry.heartbeat("p0", Load(waiting=3), 101.5)
    assert [s.instance_id for s in registry.instances()] == ["d0", "p0"]
    assert registry.get("p0").load.waiting == 3
    assert index.longest_prefix("p0", hashes) == 4
    index.apply("d0", KvEventKind.STORED, hashes[:2], Tier.DEVICE)
    assert registry.expire(102.0) == []

    started = time.monotonic()
    for _ in range(20):  # calls while down do not each wait for a connect timeout: the link probes every retry_s
        registry.instances()
    assert time.monotonic() - started < 2.0

    server.start(lambda: connect(url, PASSWORD, timeout_s=0.5))  # back, and empty
    wait_until(lambda: registry.instances() and link.up and link.resyncs >= 1, timeout_s=10.0,
               what="the replica to find Redis again and write its state back")
    other = connect(url, PASSWORD, timeout_s=0.5)  # what another replica reading Redis now sees
    assert sorted(k.decode() for k in other.hkeys("t:instances")) == ["d0", "p0"]
    assert other.hlen("t:kv:p0") == 4 and other.hlen("t:kv:d0") == 2
    assert index.longest_prefix("p0", hashes) == 4  # read from Redis again


def test_a_fast_redis_restart_is_noticed_by_its_marker(password_redis):
    server, url = password_redis
    registry, index, link = mirrored_state(connect(url, PASSWORD, timeout_s=0.5), 30.0, "t", retry_s=0.1)
    registry.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.1:1"), Load(), 100.0)
    registry.instances()  # the first read writes the marker
    connect(url, PASSWORD, timeout_s=0.5).flushall()  # Redis lost everything; no call of ours failed
    time.sleep(0.15)
    assert [s.instance_id for s in registry.instances()] == ["p0"]
    assert connect(url, PASSWORD, timeout_s=0.5).hexists("t:instances", "p0")
    assert link.up and link.resyncs >= 2


def _make_certs(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=crescent-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")
    return {name: folder / f"{name}" for name in ("ca.crt", "server.crt", "server.key")}


@pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed (apt-get install openssl)")
def test_tls_with_a_private_ca(tmp_path):
    certs = _make_certs(tmp_path)
    server = RedisServer([])
    server.extra = ["--port", "0", "--tls-port", str(server.port), "--tls-cert-file", str(certs["server.crt"]),
                    "--tls-key-file", str(certs["server.key"]), "--tls-ca-cert-file", str(certs["ca.crt"]),
                    "--tls-auth-clients", "no", "--requirepass", PASSWORD]
    url = f"redis://127.0.0.1:{server.port}/0"
    server.start(lambda: connect(url, PASSWORD, tls=True, ca_file=str(certs["ca.crt"]), timeout_s=0.5))
    try:
        with pytest.raises(redis.ConnectionError):  # plain text to a TLS port
            connect(url, PASSWORD, timeout_s=0.5).ping()
        with pytest.raises(redis.ConnectionError):  # TLS, but the server's CA is not trusted
            connect(url, PASSWORD, tls=True, timeout_s=0.5).ping()
        registry, _, link = mirrored_state(connect(url, PASSWORD, tls=True, ca_file=str(certs["ca.crt"])), 30.0,
                                           "t")
        registry.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.1:1"), Load(), 100.0)
        assert link.up and [s.instance_id for s in registry.instances()] == ["p0"]
    finally:
        server.stop()


def test_a_conductor_process_serves_through_a_redis_outage(password_redis, tmp_path):
    server, url = password_redis
    (tmp_path / "redis-password").write_text(PASSWORD + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "crescent.cli", "serve", "conductor", "--port", str(port), "--metrics-port", "0",
           "--redis-url", url, "--redis-password-file", str(tmp_path / "redis-password"), "--redis-retry-s", "0.3",
           "--rejection", "none", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stderr=subprocess.PIPE, text=True)
    channel, c = stub(f"127.0.0.1:{port}")
    hashes = prefix_block_hashes(list(range(64)), 16, "m")

    def place(rid: str) -> conductor_pb2.PlaceResponse:
        return c.Place(conductor_pb2.PlaceRequest(request_id=rid, model_id="m", prompt_tokens=70, max_tokens=8,
                                                  block_hashes=hashes), timeout=5)
    try:
        wait_until(lambda: c.ListInstances(conductor_pb2.ListInstancesRequest(), timeout=2) is not None,
                   timeout_s=30.0, what="the conductor to serve")
        register(c, "p0", common_pb2.ROLE_PREFILL)
        register(c, "d0", common_pb2.ROLE_DECODE)
        assert place("r1").accepted
        server.kill()
        for i in range(5):  # Redis is gone: placement, heartbeats and registration go on
            assert c.Heartbeat(conductor_pb2.HeartbeatRequest(instance_id="p0"), timeout=5).known
            assert place(f"down-{i}").accepted
        register(c, "d1", common_pb2.ROLE_DECODE)
        server.start(lambda: connect(url, PASSWORD, timeout_s=0.5))
        seen = connect(url, PASSWORD, timeout_s=0.5)
        wait_until(lambda: (place("probe").accepted
                            and sorted(k.decode() for k in seen.hkeys("crescent:instances")) == ["d0", "d1", "p0"]),
                   timeout_s=15.0, what="the conductor to write its registry back to the restarted Redis")
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err[-2000:]
    assert "redis unreachable" in err and "redis reachable again" in err
