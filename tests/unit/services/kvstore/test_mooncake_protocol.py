"""The Mooncake transport's protocol setting: tcp anywhere, rdma (with the NICs to use) only where the node has one."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from crescent.services.kvstore.mooncake import check_protocol, new_engine, rdma_devices
from crescent.services.kvstore.server import run_in_thread
from crescent.services.kvstore.settings import KvStoreSettings


def settings(**kw) -> KvStoreSettings:
    return KvStoreSettings(transport="mooncake", **kw)


def test_tcp_is_the_default_and_rdma_takes_nic_names():
    assert KvStoreSettings().mooncake_protocol == "tcp" and settings().mooncake_device == ""
    assert settings(mooncake_protocol="rdma").mooncake_device == ""  # every RDMA NIC on the node
    assert settings(mooncake_protocol="rdma", mooncake_device="mlx5_0,mlx5_1").mooncake_device == "mlx5_0,mlx5_1"


def test_the_environment_sets_them(monkeypatch):
    monkeypatch.setenv("CRESCENT_TRANSPORT", "mooncake")
    monkeypatch.setenv("CRESCENT_MOONCAKE_PROTOCOL", "rdma")
    monkeypatch.setenv("CRESCENT_MOONCAKE_DEVICE", "mlx5_2")
    s = KvStoreSettings()
    assert (s.mooncake_protocol, s.mooncake_device) == ("rdma", "mlx5_2")


@pytest.mark.parametrize(("kw", "says"), [
    ({"mooncake_protocol": "roce"}, "'tcp' or 'rdma'"),
    ({"mooncake_device": "mlx5_0"}, "set mooncake_protocol=rdma or clear mooncake_device"),
    ({"mooncake_protocol": "rdma", "mooncake_device": "mlx5 0"}, "NIC names separated by commas"),
    ({"mooncake_protocol": "rdma", "mooncake_device": "mlx5_0,,mlx5_1"}, "NIC names separated by commas"),
    ({"mooncake_protocol": "rdma", "mooncake_device": "../mlx5_0"}, "NIC names separated by commas"),
], ids=["unknown-protocol", "device-with-tcp", "space", "empty-name", "path"])
def test_bad_combinations_are_refused_with_the_fix(kw, says):
    with pytest.raises(ValidationError, match=says):
        settings(**kw)


@pytest.mark.parametrize("kw", [{"mooncake_protocol": "rdma"}, {"mooncake_device": "mlx5_0"}])
def test_they_need_the_mooncake_transport(kw):
    with pytest.raises(ValidationError, match="apply to transport=mooncake"):
        KvStoreSettings(transport="tcp", **kw)


def test_rdma_needs_the_nics_it_names(tmp_path):
    check_protocol("tcp", "", [])  # tcp needs nothing
    check_protocol("rdma", "", ["mlx5_0"])
    check_protocol("rdma", "mlx5_0", ["mlx5_0", "mlx5_1"])
    with pytest.raises(RuntimeError, match="no RDMA NIC.*use mooncake_protocol=tcp"):
        check_protocol("rdma", "", [])
    with pytest.raises(RuntimeError, match=r"\['mlx5_1'\] not among this node's RDMA NICs \['mlx5_0'\]"):
        check_protocol("rdma", "mlx5_0,mlx5_1", ["mlx5_0"])
    (tmp_path / "mlx5_1").mkdir()
    (tmp_path / "mlx5_0").mkdir()
    assert rdma_devices(tmp_path) == ["mlx5_0", "mlx5_1"]
    assert rdma_devices(tmp_path / "absent") == []


@pytest.mark.skipif(bool(rdma_devices()), reason="this node has an RDMA NIC")
def test_a_store_without_an_rdma_nic_refuses_rdma_and_frees_its_ports(tmp_path):
    with pytest.raises(RuntimeError, match="no RDMA NIC"):
        new_engine("127.0.0.1", "rdma")
    s = settings(port=0, data_port=0, metrics_port=0, mooncake_protocol="rdma", dram_capacity_bytes=1 << 16,
                 ssd_capacity_bytes=1 << 16, data_dir=str(tmp_path), ssd_fsync=False)
    with pytest.raises(RuntimeError, match="use mooncake_protocol=tcp"):
        run_in_thread(s)
    pytest.importorskip("mooncake.engine")
    run_in_thread(s.model_copy(update={"mooncake_protocol": "tcp"})).stop()  # the data dir's lock was released
