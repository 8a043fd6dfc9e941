"""VllmBlockMap: vLLM's prefix-cache pages in crescent's block hashes (what the conductor's index keys on), without
vLLM. The relay's decoding of vLLM's own event batches is exercised with vLLM in
tests/integration/test_vllm_kv_events.py."""

from __future__ import annotations

import pytest

from crescent.hashing import prefix_block_hashes
from crescent.services.worker.vllm_kv_events import VllmBlockMap, kv_events_endpoint

TOKENS = list(range(100, 228))  # 128 tokens: 4 vLLM pages of 32, 8 crescent blocks of 16


def test_stored_pages_give_the_prompts_crescent_hashes():
    blocks = VllmBlockMap("m", 16, 32)
    expected = prefix_block_hashes(TOKENS, 16, "m")
    # one event with two pages from the root, then one page per event, each naming its parent (as vLLM does)
    assert blocks.stored(["p0", "p1"], None, TOKENS[:64]) == expected[:4]
    assert blocks.stored(["p2"], "p1", TOKENS[64:96]) == expected[4:6]
    assert blocks.stored(["p3"], "p2", TOKENS[96:]) == expected[6:]
    assert blocks.pages["p3"] == tuple(expected[6:])


def test_removed_pages_name_their_blocks_and_are_forgotten():
    blocks = VllmBlockMap("m", 16, 32)
    expected = prefix_block_hashes(TOKENS, 16, "m")
    blocks.stored(["p0", "p1", "p2", "p3"], None, TOKENS)
    assert blocks.removed(["p3", "p2"]) == expected[6:] + expected[4:6]  # vLLM evicts leaves first
    assert blocks.removed(["p3", "never-stored"]) == []
    assert sorted(blocks.cleared()) == sorted(expected[:4]) and blocks.pages == {}


def test_a_page_whose_parent_is_unknown_or_short_is_not_mapped():
    blocks = VllmBlockMap("m", 16, 32)
    assert blocks.stored(["p5"], "unknown-parent", TOKENS[:32]) == []
    assert blocks.stored(["p0", "p1"], None, TOKENS[:40]) == prefix_block_hashes(TOKENS[:32], 16, "m")
    assert "p1" not in blocks.pages


def test_the_model_id_namespaces_the_hashes():
    a, b = VllmBlockMap("a", 16, 32), VllmBlockMap("b", 16, 32)
    assert a.stored(["p"], None, TOKENS[:32]) != b.stored(["p"], None, TOKENS[:32])


def test_pages_must_hold_whole_blocks():
    with pytest.raises(ValueError, match="multiple of kv_block_size"):
        VllmBlockMap("m", 24, 32)


def test_the_endpoint_is_an_ipc_name_vllm_binds_and_leaves_no_file():
    endpoint = kv_events_endpoint("decode-host/1:50071")
    assert endpoint.startswith("ipc://@crescent-kv-events-decode-host-1-50071-")  # Linux: the abstract namespace
