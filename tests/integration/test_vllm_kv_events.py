"""vLLM's prefix-cache events reach crescent as crescent's block hashes: a real vLLM (crescent's engine arguments,
a KV cache of 80 pages) publishes what it caches and evicts over ZMQ, and the worker's relay
(services/worker/vllm_kv_events.py) maps the pages to the prompt's chained block hashes: stored when a prompt runs,
evicted when later prompts need the pages; a real conductor's placement then no longer counts the evicted prefix. Skipped without .venv-vllm (`make vllm`); one vLLM start (in-process
engine core), about a minute on a quiet 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from crescent.hashing import prefix_block_hashes
from crescent.services.conductor.server import run_in_thread as run_conductor
from crescent.services.conductor.settings import ConductorSettings
from tests.e2e.vllm_helpers import prompts, vllm_python_or_skip

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = vllm_python_or_skip()  # CRESCENT_VLLM_PYTHON, else .venv-vllm here (`make vllm`)
DRIVER = Path(__file__).with_name("vllm_kv_events_run.py")
TOKEN = "vllm-kv-events-test-token"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_vllm_stores_and_evictions_arrive_as_crescent_block_hashes(tmp_path):
    from crescent.models.registry import resolve_model_path

    # three distinct prompts of 1000 tokens (31 full pages of 32 each) in a cache of 80 pages: the third evicts
    a, b, c = prompts([(0, 1000), (1000, 2000), (2000, 3000)])
    conductor = run_conductor(ConductorSettings(port=0, metrics_port=0, internal_token=TOKEN, rejection="none"))
    spec = {"model": str(resolve_model_path("default")), "pages": 80, "prompts": [a, b, c],
            "conductor": {"address": conductor.address, "token": TOKEN, "instance_id": "vllm-events"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run([VLLM_PY, str(DRIVER), str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=800)
    finally:
        conductor.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads((tmp_path / "out.json").read_text())
    events, after = out["events"], out["after"]

    def hashes(kind: str, lo: int, hi: int) -> list[int]:
        return [h for k, hs in events[lo:hi] if k == kind for h in hs]

    full = 1000 // 32 * 2  # crescent blocks of 16 in vLLM's full pages
    assert hashes("stored", 0, after[0]) == prefix_block_hashes(a, 16, "m")[:full]
    assert hashes("stored", after[0], after[1]) == prefix_block_hashes(b, 16, "m")[:full]
    assert hashes("evicted", 0, after[1]) == []  # 62 of 80 pages used: nothing had to go
    assert hashes("stored", after[1], after[2]) == prefix_block_hashes(c, 16, "m")[:full]
    evicted = hashes("evicted", after[1], after[2])
    assert evicted and set(evicted) <= set(prefix_block_hashes(a, 16, "m")), "the least recently used prompt goes"
    # through the worker's link, the conductor's index followed: placement finds b and c whole, a cut short
    cached_a, cached_b, cached_c = out["cached_prefix_blocks"]
    assert cached_b == cached_c == full and cached_a < full, out["cached_prefix_blocks"]
