"""Authentication inside the cluster, on real servers on loopback: a conductor and a kvstore that share an internal
token refuse every client without it (Register, Heartbeat, Place, KV puts and gets), serve the ones with it, keep
health open, and a Register cannot take over a live instance's id."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crescent.proto.v1 import common_pb2, conductor_pb2, kvstore_pb2, kvstore_pb2_grpc
from crescent.services.common.auth import sync_channel
from crescent.services.common.grpc_util import ChannelPool
from crescent.services.conductor import server as conductor_server
from crescent.services.conductor.settings import ConductorSettings
from crescent.services.kvstore import wire as p
from crescent.services.kvstore.client import KvStoreClient
from crescent.services.kvstore.server import run_in_thread as run_kvstore
from crescent.services.kvstore.transport import ServerError, TransferError
from crescent.services.worker.conductor_link import ConductorLink

from .conductor_client import register, stub, wait_until
from .test_kvstore import BLOCK, LAYERS, block
from .test_kvstore import settings as kvstore_settings

TOKEN = "test-internal-token-0123456789"
PREFILL, DECODE, KVSTORE = common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE, common_pb2.ROLE_KVSTORE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def cluster(tmp_path):
    """A conductor and a kvstore (which registers with it), both requiring TOKEN."""
    conductor = conductor_server.run_in_thread(ConductorSettings(
        port=0, metrics_port=0, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0, internal_token=TOKEN))
    store = run_kvstore(kvstore_settings(tmp_path, internal_token=TOKEN, conductor_address=conductor.address,
                                         heartbeat_interval_s=0.2, instance_id="store-0"))
    channel, admin = stub(conductor.address, TOKEN)
    try:
        yield conductor, store, admin
    finally:
        channel.close()
        store.stop()
        conductor.stop()


def _code(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() != UNAUTHENTICATED or "internal token" in err.details()
        return err.code()
    return None


def _listed(admin) -> dict[str, str]:
    reply = admin.ListInstances(conductor_pb2.ListInstancesRequest(), timeout=5)
    return {s.instance.instance_id: s.instance.address for s in reply.instances}


def _health(address: str) -> int:
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _place(client) -> conductor_pb2.PlaceResponse:
    return client.Place(conductor_pb2.PlaceRequest(request_id="r1", model_id="m", prompt_tokens=32, max_tokens=4,
                                                   block_hashes=[1, 2]), timeout=5)


@pytest.mark.parametrize("token", ["", "not-the-token"], ids=["no_token", "wrong_token"])
def test_the_conductor_refuses_every_call_without_the_token(cluster, token):
    conductor, _, admin = cluster
    channel, stranger = stub(conductor.address, token)
    with channel:
        beat = conductor_pb2.HeartbeatRequest(instance_id="store-0", load=common_pb2.Load())
        calls = {
            "Register": lambda: register(stranger, "intruder", PREFILL),
            "Heartbeat": lambda: stranger.Heartbeat(beat, timeout=5),
            "Place": lambda: _place(stranger),
            "ListInstances": lambda: _listed(stranger),
            "Deregister": lambda: stranger.Deregister(conductor_pb2.DeregisterRequest(instance_id="store-0"),
                                                      timeout=5),
        }
        assert {name: _code(call) for name, call in calls.items()} == dict.fromkeys(calls, UNAUTHENTICATED)
    assert _health(conductor.address) == health_pb2.HealthCheckResponse.SERVING  # probes need no secret
    wait_until(lambda: "store-0" in _listed(admin), 10.0, "the kvstore to register with its token")
    assert "intruder" not in _listed(admin)


def test_with_the_token_register_heartbeat_and_place_work(cluster):
    conductor, _, admin = cluster
    register(admin, "p0", PREFILL)
    register(admin, "d0", DECODE, free_kv_blocks=100, total_kv_blocks=100)
    assert admin.Heartbeat(conductor_pb2.HeartbeatRequest(instance_id="p0", load=common_pb2.Load()), timeout=5).known
    wait_until(lambda: "store-0" in _listed(admin), 10.0, "the kvstore to register with its token")
    placed = _place(admin)
    assert placed.accepted and (placed.prefill.instance_id, placed.decode.instance_id) == ("p0", "d0")

    async def pooled(token: str) -> grpc.StatusCode | int:  # the gateway's channels
        pool = ChannelPool(token)
        try:
            from crescent.proto.v1 import conductor_pb2_grpc

            reply = await conductor_pb2_grpc.ConductorStub(pool.get(conductor.address)).ListInstances(
                conductor_pb2.ListInstancesRequest(), timeout=5)
            return len(reply.instances)
        except grpc.aio.AioRpcError as err:
            return err.code()
        finally:
            await pool.close()

    assert asyncio.run(pooled(TOKEN)) == 3 and asyncio.run(pooled("")) == UNAUTHENTICATED


def test_a_register_cannot_take_over_a_live_instance_id(cluster):
    conductor, _, admin = cluster

    def register_at(iid: str, address: str) -> conductor_pb2.RegisterResponse:
        info = conductor_pb2.InstanceInfo(instance_id=iid, role=PREFILL, address=address, model_id="m",
                                          kv_block_size=16)
        return admin.Register(conductor_pb2.RegisterRequest(instance=info, load=common_pb2.Load()), timeout=5)

    register_at("p0", "10.0.0.1:50061")
    with pytest.raises(grpc.RpcError) as err:
        register_at("p0", "10.0.0.2:50061")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "held by a live instance at 10.0.0.1:50061" in err.value.details()
    register_at("p0", "10.0.0.1:50061")  # the same instance again (a restarted worker): allowed
    assert _listed(admin)["p0"] == "10.0.0.1:50061"

    admin.Deregister(conductor_pb2.DeregisterRequest(instance_id="p0"), timeout=5)
    register_at("p0", "10.0.0.2:50061")  # a freed id is anyone's (with the token)
    assert _listed(admin)["p0"] == "10.0.0.2:50061"
    time.sleep(1.2)  # past the 1 s heartbeat timeout without a beat: dead, even before the expiry round drops it
    register_at("p0", "10.0.0.3:50061")
    assert _listed(admin)["p0"] == "10.0.0.3:50061"


def test_the_kvstore_data_port_refuses_puts_and_gets_without_the_token(cluster):
    _, store, _ = cluster
    with KvStoreClient.connect(store.data_address, token=TOKEN) as client:
        assert client.put_blocks("m", [1, 2], [block(1), block(2)], LAYERS) == 2
    with KvStoreClient.connect(store.data_address) as stranger:  # connecting is not refused; every request is
        with pytest.raises(TransferError):  # the refusal, or a reset: the store closes without reading the block
            stranger.put_blocks("m", [3], [block(3)], LAYERS)
        with pytest.raises(ServerError, match="needs the internal token"):
            stranger.get_blocks("m", [1, 2], LAYERS)
        with pytest.raises(ServerError, match="needs the internal token"):
            stranger.lookup_prefix("m", [1, 2])
    with pytest.raises(ServerError, match="wrong internal token"):
        KvStoreClient.connect(store.data_address, token="not-the-token")
    with KvStoreClient.connect(store.data_address, token=TOKEN) as client:
        assert client.lookup_prefix("m", [1, 2, 3], LAYERS) == 2  # the stranger's block was never stored
        assert [bytes(b) for b in client.get_blocks("m", [1, 2], LAYERS)] == [block(1), block(2)]
        client.transport.conn.drop()  # a new connection authenticates again by itself
        assert client.lookup_prefix("m", [1, 2], LAYERS) == 2
    assert store.store.stats()["blocks_dram"] == 2


def test_a_raw_stranger_is_closed_before_any_block_is_read(cluster):
    _, store, _ = cluster
    host, port = store.data_address.rsplit(":", 1)
    req = p.BlockRequest("m", *LAYERS, np.array([9], np.uint64), np.array([BLOCK], np.uint64),
                         np.zeros(1, np.uint32)).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(p.pack_header(p.Op.PUT, 1, len(req), BLOCK) + req + block(9))
        head = sock.recv(p.HEADER.size, socket.MSG_WAITALL)
        _, status, _, body_len, _ = p.unpack_header(head)
        assert status == p.Status.ERROR
        assert b"needs the internal token" in sock.recv(body_len, socket.MSG_WAITALL)
        assert _closed(sock)
    with socket.create_connection((host, int(port)), timeout=5) as idle:  # says nothing: dropped after io_timeout_s
        assert _closed(idle, within_s=4.0)
    assert store.store.stats()["blocks_dram"] == 0


def _closed(sock: socket.socket, within_s: float = 2.0) -> bool:
    """True once the peer closes (EOF or reset) within ``within_s``; anything it still sends is read and dropped."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_the_kvstore_grpc_needs_the_token_and_its_health_does_not(cluster):
    _, store, _ = cluster
    assert _health(store.grpc_address) == health_pb2.HealthCheckResponse.SERVING
    for token, expected in (("", UNAUTHENTICATED), (TOKEN, None)):
        with sync_channel(store.grpc_address, token, [("grpc.enable_http_proxy", 0)]) as ch:
            kv = kvstore_pb2_grpc.KvStoreStub(ch)
            assert _code(lambda kv=kv: kv.Stats(kvstore_pb2.StatsRequest(), timeout=5)) == expected
            lookup = kvstore_pb2.LookupRequest(model_id="m", block_hashes=[1])
            assert _code(lambda kv=kv, r=lookup: kv.Lookup(r, timeout=5)) == expected


def test_a_kvstore_with_the_wrong_token_cannot_register(cluster, tmp_path):
    conductor, _, admin = cluster
    wrong = run_kvstore(kvstore_settings(tmp_path / "wrong", internal_token="not-the-token",
                                         conductor_address=conductor.address, heartbeat_interval_s=0.1,
                                         instance_id="store-wrong"))
    try:
        wait_until(lambda: "store-0" in _listed(admin), 10.0, "the right kvstore to register")
        time.sleep(0.5)  # several of the wrong one's attempts
        assert "store-wrong" not in _listed(admin)
    finally:
        wrong.stop()


def test_a_worker_link_registers_with_the_token_and_not_without(cluster):
    conductor, _, admin = cluster

    async def link_for(iid: str, token: str) -> bool:
        info = conductor_pb2.InstanceInfo(instance_id=iid, role=DECODE, address=f"127.0.0.1:{iid}", model_id="m",
                                          kv_block_size=16)

        async def load() -> common_pb2.Load:
            return common_pb2.Load()

        link = ConductorLink(conductor.address, info, load, heartbeat_interval_s=0.05, internal_token=token)
        await link.start()
        for _ in range(40):  # bounded: 2 s
            if link.registered:
                break
            await asyncio.sleep(0.05)
        registered = link.registered
        await link.stop()
        return registered

    assert asyncio.run(link_for("9001", TOKEN)) is True
    assert asyncio.run(link_for("9002", "")) is False
    assert "9002" not in _listed(admin)


def test_a_worker_moves_kv_blocks_with_the_token_and_not_without(cluster):
    import torch

    from crescent.services.worker.kv_transfer import KvTransfer

    _, store, _ = cluster
    shape = (2, 2, 4, 1, 8)  # [layers, k/v, block_size, kv_heads, head_dim]
    kv = torch.arange(float(np.prod(shape))).reshape(shape)

    async def move(token: str) -> tuple[int, list[torch.Tensor]]:
        transfer = KvTransfer(shape, torch.float32, timeout_s=5.0, internal_token=token)
        try:
            stored = await transfer.put(store.data_address, "tcp", "m", [77], [kv])
            return stored, await transfer.get(store.data_address, "tcp", "m", [77])
        finally:
            transfer.close()

    stored, got = asyncio.run(move(TOKEN))
    assert stored == 1 and torch.equal(got[0], kv)
    with pytest.raises(TransferError):
        asyncio.run(move(""))
