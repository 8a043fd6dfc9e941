"""Disaggregated serving with vLLM on both sides: a vLLM prefill worker saves the prompt's KV to the kvstore through
CrescentConnector, a vLLM decode worker loads it instead of recomputing, and greedy output equals
`vllm.LLM.generate` token for token. A second request sharing a long prefix reads it instead of computing it.

Needs CrescentConnector (services/worker/vllm_connector.py) and a Python with vLLM; skips without either.
"""

from __future__ import annotations

import os

import openai
import pytest

from crescent.services.common.launcher import free_port, plan_local_cluster, start_cluster
from crescent.services.worker.engines import CONNECTOR_MODULE, connector_available
from tests.e2e.vllm_helpers import (
    MAX_MODEL_LEN,
    REPO,
    assert_greedy_equal,
    prompts,
    reference_outputs,
    start_reference,
    vllm_python_or_skip,
)
from tests.integration.real_cluster import scrape

pytestmark = [pytest.mark.skipif(not connector_available(),
                                 reason=f"CrescentConnector ({CONNECTOR_MODULE}) is not in this tree yet: the "
                                        "vLLM disaggregated path needs it (issue #16's connector half)"),
              pytest.mark.slow, pytest.mark.timeout(1200)]  # two vLLM workers start on 2 shared cores
STARTUP_S = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    python = vllm_python_or_skip()
    tmp = tmp_path_factory.mktemp("vllm-disagg")
    token_prompts = prompts([(0, 110), (500, 900), (1000, 1900), (2000, 3500)])
    env = {"PYTHONPATH": str(REPO), "CRESCENT_LOG_LEVEL": "info", "CRESCENT_DTYPE": "float32",
           "CRESCENT_DEVICE": "cpu", "CRESCENT_VLLM_KV_CACHE_GIB": "1"}
    env.update({k: "" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    reference = start_reference(python, tmp, token_prompts, {**os.environ, **env})
    from crescent.models.prepare import prepare_model

    model = str(prepare_model("default"))
    worker = {"max_model_len": MAX_MODEL_LEN, "vllm_kv_connector": "crescent", "heartbeat_interval_s": 0.5}
    extra = {"prefill": worker, "decode": worker, "gateway": {"max_model_len": MAX_MODEL_LEN},
             "conductor": {"rejection": "none"},
             "kvstore": {"dram_capacity_bytes": 256 << 20, "ssd_capacity_bytes": 0, "data_dir": str(tmp / "ssd")}}
    plan = plan_local_cluster(model, "SmolLM2-135M-Instruct", gateway_port=free_port(), free_ports=True,
                              extra=extra, engine="vllm", worker_python=python)
    try:
        group = start_cluster(plan, tmp / "logs", env, timeout_s=STARTUP_S)
    except BaseException:
        reference.kill()
        raise
    yield {"plan": plan, "prompts": token_prompts, "reference": reference, "tmp": tmp}
    group.stop()
    if reference.poll() is None:
        reference.kill()
        reference.wait(timeout=10)


def test_decode_loads_the_prompt_and_greedy_equals_vllm(cluster):
    plan = cluster["plan"]
    client = openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=180)
    model = client.models.list().data[0].id
    reference = reference_outputs(cluster["reference"], cluster["tmp"], STARTUP_S)
    assert_greedy_equal(client, model, cluster["prompts"], reference)
    decode, store = plan.metrics_urls("decode"), plan.metrics_urls("kvstore")
    assert scrape(decode, "crescent_worker_kvstore_hit_tokens_total", {"role": "decode"}) > 0
    assert scrape(store, "crescent_kvstore_operations_total", {"op": "get", "result": "hit"}) > 0
    assert scrape(plan.metrics_urls("prefill"), "crescent_worker_kv_connector_total",
                  {"counter": "stored_blocks"}) > 0


def test_a_shared_prefix_is_read_not_computed(cluster):
    plan = cluster["plan"]
    client = openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=180)
    model = client.models.list().data[0].id
    prefix = prompts([(3500, 4524)])[0]  # 1K tokens
    prefill = plan.metrics_urls("prefill")
    client.completions.create(model=model, prompt=prefix + [11, 12, 13], max_tokens=2, temperature=0)
    computed = scrape(prefill, "crescent_worker_prompt_tokens_total", {"role": "prefill"})
    client.completions.create(model=model, prompt=prefix + [21, 22, 23, 24], max_tokens=2, temperature=0)
    second = scrape(prefill, "crescent_worker_prompt_tokens_total", {"role": "prefill"}) - computed
    assert second < 100, f"the second prompt computed {second} of {len(prefix) + 4} tokens"
