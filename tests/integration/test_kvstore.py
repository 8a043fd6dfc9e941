"""The kvstore as a running service on free loopback ports: gRPC control plane, tcp data path, bad clients."""

from __future__ import annotations

import random
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crescent.proto.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from crescent.services.kvstore import wire as p
from crescent.services.kvstore.blocks import BlockKey
from crescent.services.kvstore.client import KvStoreClient
from crescent.services.kvstore.server import run_in_thread
from crescent.services.kvstore.settings import KvStoreSettings
from crescent.services.kvstore.transport import ServerError, TransferError, TransferState

BLOCK = 4096
LAYERS = (0, 2)


def block(seed: int, size: int = BLOCK) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def settings(tmp_path, **kw) -> KvStoreSettings:
    base = dict(
        port=0,
        data_port=0,
        metrics_port=0,
        dram_capacity_bytes=64 * BLOCK,
        ssd_capacity_bytes=1024 * BLOCK,
        data_dir=str(tmp_path / "ssd"),
        block_bytes=BLOCK,
        ssd_fsync=False,
        io_timeout_s=2.0,
        drain_timeout_s=1.0,
    )
    return KvStoreSettings(**{**base, **kw})


@pytest.fixture
def store(tmp_path):
    handle = run_in_thread(settings(tmp_path))
    yield handle
    handle.stop()


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_grpc_lookup_stats_and_health(store):
    assert health(store.grpc_address) == health_pb2.HealthCheckResponse.SERVING
    with KvStoreClient.connect(store.data_address) as client:
        assert client.put_blocks("m", [11, 12, 13], [block(1), block(2), block(3)], LAYERS) == 3
    with grpc.insecure_channel(store.grpc_address) as ch:
        stub = kvstore_pb2_grpc.KvStoreStub(ch)
        reply = stub.Lookup(
            kvstore_pb2.LookupRequest(
                model_id="m", block_hashes=[11, 12, 99, 13], layer_start=0, layer_end=2
            ),
            timeout=2,
        )
        assert reply.prefix_blocks == 2
        assert list(reply.tiers) == [common_pb2.TIER_DRAM] * 2 + [
            common_pb2.TIER_UNSPECIFIED,
            common_pb2.TIER_DRAM,
        ]
        stats = stub.Stats(kvstore_pb2.StatsRequest(), timeout=2)
        assert (stats.blocks_dram, stats.dram_bytes_used, stats.transport) == (3, 3 * BLOCK, "tcp")
        assert stats.data_address == store.data_address and stats.dram_bytes_capacity == 64 * BLOCK
        anyrange = stub.Lookup(kvstore_pb2.LookupRequest(model_id="m", block_hashes=[11, 12, 13]), timeout=2)
        assert anyrange.prefix_blocks == 3 and set(anyrange.tiers) == {common_pb2.TIER_DRAM}
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(kvstore_pb2.LookupRequest(model_id="m", block_hashes=[1], layer_start=3, layer_end=2))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sixteen_concurrent_clients_with_demotion(store):
    """16 threads put and read back 16 blocks each (4x the DRAM tier): every byte checked, all bounded."""
    errors: list[str] = []

    def worker(w: int) -> None:
        rng = random.Random(w)
        hashes = [w * 1000 + i for i in range(16)]
        with KvStoreClient.connect(store.data_address, timeout_s=20, verify_checksums=True) as client:
            for start in range(0, 16, 4):
                chunk = hashes[start : start + 4]
                if client.put_blocks("m", chunk, [block(h) for h in chunk], LAYERS) != 4:
                    errors.append(f"worker {w}: put failed")
            for _ in range(3):
                picked = rng.sample(hashes, 5)
                got = client.get_blocks("m", picked, LAYERS)
                for h, data in zip(picked, got, strict=True):
                    if data is None or bytes(data) != block(h):
                        errors.append(f"worker {w}: block {h} missing or wrong")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    prefix, _ = store.store.lookup("m", [w * 1000 + i for w in range(16) for i in range(16)], LAYERS)
    assert prefix == 256 and store.store.stats()["blocks_ssd"] >= 256 - 64


def test_prefix_and_metadata(store):
    with KvStoreClient.connect(store.data_address) as client:
        client.put_blocks("m", [1, 2, 4], [block(1), block(2), block(4)], LAYERS, metas=[b"c1", b"c2", b""])
        assert client.lookup_prefix("m", [1, 2, 3, 4], LAYERS) == 2
        assert client.lookup_prefix("m", [1, 2, 3, 4]) == 2      # any layer range
        assert client.lookup_prefix("m", [1, 2], (0, 1)) == 0    # that exact range was never stored
        assert [bytes(v) for v in client.get_prefix("m", [1, 2, 3, 4], LAYERS)] == [block(1), block(2)]
        got = client.get_blocks_with_meta("m", [2, 9, 1], LAYERS)
        assert got[1] is None and (got[0].meta, got[2].meta) == (b"c2", b"c1")
        assert client.get_blocks("other-model", [1], LAYERS) == [None]  # unknown keys are misses
        assert client.get_blocks("m", [1], (0, 1)) == [None]  # another layer range too


def test_batch_mixing_new_and_stored_blocks(store):
    """Small blocks take the coalesced receive path; already-stored ones are drained, order is kept."""
    with KvStoreClient.connect(store.data_address) as client:
        assert client.put_blocks("m", [1, 2, 3], [block(1), block(2), block(3)], LAYERS) == 3
        assert client.put_blocks("m", [2, 4, 3, 5, 6], [block(h) for h in (2, 4, 3, 5, 6)], LAYERS) == 5
        half = block(7, BLOCK // 2)  # a short block breaks the run of full slots
        assert client.put_blocks("m", [7, 8], [half, block(8)], LAYERS) == 2
        got = client.get_blocks("m", [1, 2, 3, 4, 5, 6, 7, 8], LAYERS)
        assert [bytes(g) for g in got] == [block(h) for h in range(1, 7)] + [half, block(8)]


def test_bad_sizes_and_layer_ranges_are_refused_and_the_client_recovers(store):
    with KvStoreClient.connect(store.data_address) as client:
        with pytest.raises(ServerError, match="block sizes"):
            client.put_blocks("m", [1], [b"x" * (BLOCK + 1)], LAYERS)
        with pytest.raises(ServerError, match="layer range"):
            client.get_blocks("m", [1], (3, 3))
        with pytest.raises(ValueError, match="2 hashes but 1 blocks"):
            client.put_blocks("m", [1, 2], [block(1)], LAYERS)
        assert client.put_blocks("m", [1], [block(1)], LAYERS) == 1
        assert bytes(client.get_blocks("m", [1], LAYERS)[0]) == block(1)


def test_corrupt_block_is_a_miss_over_tcp(store):
    from prometheus_client import REGISTRY

    with KvStoreClient.connect(store.data_address) as client:
        client.put_blocks("m", [1, 2], [block(1), block(2)], LAYERS)
        before = REGISTRY.get_sample_value("crescent_kvstore_corrupt_blocks_total", {"tier": "dram"}) or 0
        store.store.arena.buffer[100] ^= 0x40  # block 1 sits in slot 0
        got = client.get_blocks("m", [1, 2], LAYERS)
        assert got[0] is None and bytes(got[1]) == block(2)
        assert (
            REGISTRY.get_sample_value("crescent_kvstore_corrupt_blocks_total", {"tier": "dram"}) == before + 1
        )
        assert client.lookup_prefix("m", [1], LAYERS) == 0  # dropped from the store


def test_torch_tensor_blocks_roundtrip(store):
    import torch

    kv = torch.randn(2, 2, 16, 2, 8).to(torch.bfloat16)  # [layers, k/v, block_size, kv_heads, head_dim]
    with KvStoreClient.connect(store.data_address) as client:
        assert client.put_blocks("m", [42], [kv], LAYERS) == 1
        back = client.get_blocks("m", [42], LAYERS)[0]
        assert torch.equal(torch.frombuffer(bytearray(back), dtype=torch.bfloat16).view_as(kv), kv)


def raw_connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def test_malformed_frame_gets_an_error_and_others_keep_working(store):
    with KvStoreClient.connect(store.data_address) as good:
        good.put_blocks("m", [1], [block(1)], LAYERS)
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            p.pack_header(p.Op.GET, 1, p.MAX_BODY_BYTES + 1, 0),
            p.pack_header(p.Op.PUT, 1, 5, 0) + b"short",
        ):
            sock = raw_connect(store.data_address)
            sock.sendall(garbage)
            head = p.recv_exact(sock, p.HEADER.size)
            _, status, _, body_len, _ = p.unpack_header(head)
            assert status == p.Status.ERROR and p.recv_exact(sock, body_len)
            assert sock.recv(1) == b""  # the server closed this connection
            sock.close()
        assert bytes(good.get_blocks("m", [1], LAYERS)[0]) == block(1)


def test_disconnect_mid_put_publishes_nothing(store):
    free_before = store.store.arena.free_slots
    req = p.BlockRequest(
        "m",
        *LAYERS,
        np.array([77, 78], np.uint64),
        np.array([BLOCK, BLOCK], np.uint64),
        np.array([0, 0], np.uint32),
    )
    body = req.encode()
    sock = raw_connect(store.data_address)
    sock.sendall(
        p.pack_header(p.Op.PUT, 2, len(body), 2 * BLOCK) + body + block(77) + block(78)[: BLOCK // 2]
    )
    sock.close()
    deadline = time.monotonic() + 5
    while store.data.active_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    with KvStoreClient.connect(store.data_address) as client:
        assert client.get_blocks("m", [78], LAYERS) == [None]  # the half block never appears
        got = client.get_blocks("m", [77], LAYERS)[0]  # the whole one before it may; if so, intact
        assert got is None or bytes(got) == block(77)
    assert store.store.arena.free_slots == free_before - (got is not None)


def test_stalled_client_is_dropped(store):
    sock = raw_connect(store.data_address)
    sock.sendall(p.pack_header(p.Op.GET, 1, 100, 0) + b"only part of the body")
    sock.settimeout(5)
    started = time.monotonic()
    assert sock.recv(1) == b""  # io_timeout_s = 2: the server gives up on it
    assert time.monotonic() - started < 4.5
    sock.close()


def test_abort_and_timeout_of_a_transfer_to_a_silent_server():
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    with KvStoreClient.connect(f"127.0.0.1:{port}", timeout_s=10) as client:
        timer = threading.Timer(0.3, client.abort)
        timer.start()
        started = time.monotonic()
        with pytest.raises(TransferError, match="aborted"):
            client.get_blocks("m", [1], LAYERS)
        assert time.monotonic() - started < 5
    with KvStoreClient.connect(f"127.0.0.1:{port}", timeout_s=0.3) as client:
        with pytest.raises(TransferError, match="timed out"):
            client.lookup_prefix("m", [1], LAYERS)
        assert client.transport.current is None
    silent.close()


def test_transfer_state_is_success_after_a_put(store):
    with KvStoreClient.connect(store.data_address) as client:
        seen = []
        original = client.transport.conn.request

        def spy(*args):
            seen.append(client.transport.current.poll())
            return original(*args)

        client.transport.conn.request = spy
        client.put_blocks("m", [5], [block(5)], LAYERS)
        assert seen == [TransferState.TRANSFERRING]


def test_restart_finds_demoted_blocks(tmp_path):
    handle = run_in_thread(settings(tmp_path, dram_capacity_bytes=2 * BLOCK))
    with KvStoreClient.connect(handle.data_address) as client:
        client.put_blocks("m", [1, 2, 3, 4], [block(h) for h in (1, 2, 3, 4)], LAYERS)
    handle.stop()
    again = run_in_thread(settings(tmp_path, dram_capacity_bytes=2 * BLOCK))
    try:
        with KvStoreClient.connect(again.data_address) as client:
            assert client.lookup_prefix("m", [1, 2], LAYERS) == 2  # 1 and 2 were demoted to SSD
            assert [bytes(b) for b in client.get_blocks("m", [1, 2], LAYERS)] == [block(1), block(2)]
    finally:
        again.stop()


def test_a_second_store_on_the_same_data_dir_is_refused_and_the_first_keeps_serving(tmp_path):
    from crescent.services.kvstore.dir_lock import DataDirInUse

    first = run_in_thread(settings(tmp_path))
    try:
        with pytest.raises(DataDirInUse, match="give each kvstore its own data_dir"):
            run_in_thread(settings(tmp_path))
        with KvStoreClient.connect(first.data_address) as client:
            assert client.put_blocks("m", [1], [block(1)], LAYERS) == 1
            assert bytes(client.get_blocks("m", [1], LAYERS)[0]) == block(1)
    finally:
        first.stop()
    again = run_in_thread(settings(tmp_path))  # stopped: the directory is free again, its blocks found
    try:
        assert again.store.get(BlockKey("m", 1, *LAYERS)) == (block(1), b"")
    finally:
        again.stop()
