"""The checked-in gRPC stubs must match what proto/ generates (STYLE.md habit 5)."""

import pytest

from crescent.proto import generate


def test_stubs_are_in_sync_with_protos():
    pytest.importorskip("grpc_tools")
    stale = generate.check()
    assert stale == [], f"stale stubs {stale}: run `python -m crescent.proto.generate`"


def test_stubs_import_and_roundtrip():
    from crescent.proto.v1 import common_pb2, conductor_pb2

    req = conductor_pb2.PlaceRequest(request_id="r", block_hashes=[0, 2**64 - 1], prompt_tokens=7)
    again = conductor_pb2.PlaceRequest.FromString(req.SerializeToString())
    assert list(again.block_hashes) == [0, 2**64 - 1]
    assert common_pb2.Tier.Name(common_pb2.TIER_SSD) == "TIER_SSD"
