"""The framed protocol's encoding and its limits."""

from __future__ import annotations

import numpy as np
import pytest

from crescent.services.kvstore import wire as p


def test_block_request_roundtrip():
    req = p.BlockRequest("model/ä", 2, 7, np.array([1, 2**64 - 1], np.uint64), np.array([10, 20], np.uint64),
                         np.array([0, 3], np.uint32))
    back = p.BlockRequest.decode(req.encode(), 2)
    assert (back.model_id, back.layer_start, back.layer_end) == ("model/ä", 2, 7)
    assert back.hashes.tolist() == [1, 2**64 - 1] and back.sizes.tolist() == [10, 20]
    assert back.meta_lens.tolist() == [0, 3]


@pytest.mark.parametrize("body,n,match", [
    (b"short", 0, "too short"),
    (p.BlockRequest("m", 0, 1, np.array([1], np.uint64)).encode(), 2, "does not match"),
    (b"\xff\xff" + b"\0" * 8, 0, "model id longer"),
    (b"\x02\x00" + b"\0" * 8 + b"\xff\xfe", 0, "not UTF-8"),
], ids=["short", "count-mismatch", "model-too-long", "bad-utf8"])
def test_bad_request_body(body, n, match):
    with pytest.raises(p.ProtocolError, match=match):
        p.BlockRequest.decode(body, n)


def test_header_limits():
    assert p.unpack_header(p.pack_header(p.Op.GET, 3, 40, 0))[:3] == (p.Op.GET, p.Status.OK, 3)
    with pytest.raises(p.ProtocolError, match="bad magic"):
        p.unpack_header(b"HTTP" + p.pack_header(p.Op.GET, 1, 1, 0)[4:])
    with pytest.raises(p.ProtocolError, match="unknown op"):
        p.unpack_header(p.HEADER.pack(p.MAGIC, 99, 0, 0, 0, 0, 0))
    with pytest.raises(p.ProtocolError, match="over limits"):
        p.unpack_header(p.pack_header(p.Op.PUT, p.MAX_BLOCKS + 1, 0, 0))
    with pytest.raises(p.ProtocolError, match="over limits"):
        p.unpack_header(p.pack_header(p.Op.PUT, 1, 0, p.MAX_PAYLOAD_BYTES + 1))
