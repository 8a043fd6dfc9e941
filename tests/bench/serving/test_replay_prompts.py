from __future__ import annotations

from bench.serving.replay import PromptBuilder
from bench.serving.trace import TraceRequest


def test_shared_hash_ids_give_shared_token_prefixes_and_the_baseline_shares_nothing():
    a, b = TraceRequest(0, 40, 1, (1, 2, 3)), TraceRequest(0, 40, 1, (1, 2, 9))
    shared = PromptBuilder(block_tokens=8, vocab_size=1000)
    pa, pb = shared.prompt(a, max_blocks=8), shared.prompt(b, max_blocks=8)
    assert len(pa) == 24 and pa[:16] == pb[:16] and pa[16:] != pb[16:]
    assert all(256 <= t < 1000 for t in pa)
    assert shared.prompt(a, max_blocks=2) == pa[:16]
    unique = PromptBuilder(block_tokens=8, vocab_size=1000, unique=True)
    ua, ub = unique.prompt(a, 8), unique.prompt(b, 8)
    assert ua[:8] != ub[:8]
