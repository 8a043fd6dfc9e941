from crescent.hashing import chain_hash, model_seed, prefix_block_hashes


def test_only_full_blocks_are_hashed():
    assert len(prefix_block_hashes(list(range(35)), 16)) == 2
    assert prefix_block_hashes(list(range(15)), 16) == []


def test_shared_prefix_means_shared_hashes_then_divergence():
    a = prefix_block_hashes(list(range(64)), 16, "m")
    b = prefix_block_hashes(list(range(48)) + [999] * 16, 16, "m")
    assert a[:3] == b[:3] and a[3] != b[3]


def test_chain_depends_on_parent_and_model():
    block = list(range(16))
    assert prefix_block_hashes(block, 16, "m") == [chain_hash(model_seed("m"), block)]
    assert prefix_block_hashes(block, 16, "m") != prefix_block_hashes(block, 16, "other")
    # the same block after a different parent is a different block
    assert chain_hash(1, block) != chain_hash(2, block)


def test_hashes_fit_uint64():
    for h in prefix_block_hashes(list(range(1000)), 8, "m"):
        assert 0 <= h < 2**64
