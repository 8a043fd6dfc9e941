"""Every Prometheus metric crescent exports, in one place (names: ``crescent_<service>_<what>_<unit>``).

Counters end in ``_total``; labels are bounded (model_name, outcome, reason, tier, role, instance). Services import the objects
from here and never create metrics of their own, so dashboards, alerts and tests have one list to check against.
Each process exposes the default registry (``/metrics`` on HTTP services; ``--metrics-port`` on gRPC services).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets (seconds) wide enough for a 2-core CPU and an H100 alike.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                     5.0)
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# --- gateway (OpenAI API) -------------------------------------------------------------------------------------
# Every request metric carries `model_name`: the served model id (one per gateway, so the label stays bounded; the
# name a client sent is never a label value).
GATEWAY_REQUESTS = Counter("crescent_gateway_requests_total", "Finished HTTP API requests by outcome.",
                           ["model_name", "endpoint", "outcome"])  # outcome: ok, rejected, bad_request, not_found, error, cancelled
GATEWAY_REJECTIONS = Counter("crescent_gateway_rejections_total", "Requests the conductor rejected, by reason.",
                             ["model_name", "reason"])
GATEWAY_RESUMES = Counter("crescent_gateway_stream_resumes_total",
                          "Choices placed again after their prefill or decode worker died mid-request.", ["model_name"])
GATEWAY_TTFT = Histogram("crescent_gateway_time_to_first_token_seconds", "Time from request to first token.",
                         ["model_name"], buckets=LATENCY_BUCKETS)
GATEWAY_ITL = Histogram("crescent_gateway_inter_token_latency_seconds", "Gap between consecutive streamed tokens.",
                        ["model_name"], buckets=TOKEN_GAP_BUCKETS)
GATEWAY_E2E = Histogram("crescent_gateway_e2e_request_latency_seconds", "Whole-request latency.",
                        ["model_name"], buckets=LATENCY_BUCKETS)
GATEWAY_PROMPT_TOKENS = Counter("crescent_gateway_prompt_tokens_total", "Prompt tokens of admitted requests.",
                                ["model_name"])
GATEWAY_GENERATION_TOKENS = Counter("crescent_gateway_generation_tokens_total", "Tokens generated.", ["model_name"])
GATEWAY_IN_FLIGHT = Gauge("crescent_gateway_requests_in_flight", "Requests being served now.", ["model_name"])

# vLLM-compatible aliases, so dashboards written for vLLM work unchanged.
VLLM_TTFT = Histogram("vllm:time_to_first_token_seconds", "Time to first token (vLLM-compatible alias).",
                      ["model_name"], buckets=LATENCY_BUCKETS)
VLLM_ITL = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency (vLLM-compatible alias).",
                     ["model_name"], buckets=TOKEN_GAP_BUCKETS)
VLLM_E2E = Histogram("vllm:e2e_request_latency_seconds", "End-to-end latency (vLLM-compatible alias).",
                     ["model_name"], buckets=LATENCY_BUCKETS)
# Workers export vLLM's engine gauges and counters under vLLM's names and `model_name` label, so vLLM dashboards and
# the Gateway API Inference Extension's endpoint picker (llm-d) read crescent workers unchanged.
VLLM_RUNNING = Gauge("vllm:num_requests_running", "Requests in the running batch (vLLM-compatible).", ["model_name"])
VLLM_WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (vLLM-compatible).",
                     ["model_name"])
VLLM_KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use, 0-1 (vLLM-compatible).",
                      ["model_name"])
VLLM_PREFIX_QUERIES = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                              "(vLLM-compatible).", ["model_name"])
VLLM_PREFIX_HITS = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (vLLM-compatible).",
                           ["model_name"])
VLLM_NUM_PREEMPTIONS = Counter("vllm:num_preemptions", "Requests preempted (vLLM-compatible).", ["model_name"])

# --- conductor ----------------------------------------------------------------------------------------------------
CONDUCTOR_PLACEMENTS = Counter("crescent_conductor_placements_total", "Placement decisions by outcome and policy.",
                               ["outcome", "policy"])  # outcome: accepted, rejected
CONDUCTOR_REJECTIONS = Counter("crescent_conductor_rejections_total", "Early rejections by reason.", ["reason"])
CONDUCTOR_INSTANCES = Gauge("crescent_conductor_instances", "Live registered instances by role.", ["role"])
CONDUCTOR_INSTANCES_DROPPED = Counter("crescent_conductor_instances_dropped_total",
                                      "Instances dropped after missing heartbeats.", ["role"])
CONDUCTOR_PREDICTED_TTFT = Histogram("crescent_conductor_predicted_ttft_seconds",
                                     "TTFT the cost model predicted for admitted requests.", buckets=LATENCY_BUCKETS)
CONDUCTOR_PREFIX_BLOCKS = Counter("crescent_conductor_prefix_blocks_total",
                                  "Prompt blocks seen at placement, and those reusable by the chosen instance.",
                                  ["kind"])  # kind: query, hit
CONDUCTOR_REDIS_UP = Gauge("crescent_conductor_redis_up",
                           "1 while the shared-state Redis answers, 0 while this replica serves from its own copy "
                           "(absent without Redis).")
CONDUCTOR_REDIS_RESYNCS = Counter("crescent_conductor_redis_resyncs_total",
                                  "Times this replica wrote its state back to Redis (Redis came back or lost it).")
CONDUCTOR_SLO = Gauge("crescent_conductor_slo_seconds", "The SLOs early rejection protects (set or sized from the "
                      "cost model).", ["kind"])  # kind: ttft, tbt
CONDUCTOR_CORRECTION = Gauge("crescent_conductor_prediction_correction", "How far measured TTFTs (their sum over the "
                             "predicted sum, recent requests) and token gaps (running mean) ran from the planner's predictions; admission scales its "
                             "predictions by it (1 = the cost model is right).", ["kind"])  # kind: ttft, tbt
CONDUCTOR_INDEXED_BLOCKS = Gauge("crescent_conductor_indexed_blocks", "Blocks in the KV index by tier.", ["tier"])

# --- workers (prefill and decode share the engine) -------------------------------------------------------------
WORKER_RUNNING = Gauge("crescent_worker_requests_running", "Requests in the running batch.", ["role"])
WORKER_WAITING = Gauge("crescent_worker_requests_waiting", "Requests waiting to be scheduled.", ["role"])
WORKER_KV_USAGE = Gauge("crescent_worker_kv_cache_usage_ratio", "Fraction of paged-cache blocks in use.", ["role"])
WORKER_PREFIX_QUERIES = Counter("crescent_worker_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                                ["role"])
WORKER_PREFIX_HITS = Counter("crescent_worker_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
                             ["role"])
WORKER_STORE_HITS = Counter("crescent_worker_kvstore_hit_tokens_total", "Prompt tokens whose KV was loaded from the store.",
                            ["role"])
WORKER_PREEMPTIONS = Counter("crescent_worker_preemptions_total", "Requests preempted (recomputed later).", ["role"])
WORKER_VLLM_KV_EVENT_BLOCKS = Counter("crescent_worker_vllm_kv_event_blocks_total", "Blocks a vLLM worker's prefix "
                                      "cache stored or evicted (vLLM's KV events), reported to the conductor.",
                                      ["role", "kind"])  # kind: stored, evicted
WORKER_KV_CONNECTOR = Counter("crescent_worker_kv_connector_total", "What a vLLM worker's CrescentConnector did, by "
                              "counter (loads, loaded_tokens, saves, stored_blocks, lookup_misses, ...).",
                              ["role", "counter"])
WORKER_PROMPT_TOKENS = Counter("crescent_worker_prompt_tokens_total", "Prompt tokens computed.", ["role"])
WORKER_GENERATION_TOKENS = Counter("crescent_worker_generation_tokens_total", "Tokens generated.", ["role"])
WORKER_STEP_SECONDS = Histogram("crescent_worker_step_seconds", "Engine step duration.", ["role", "kind"],
                                buckets=TOKEN_GAP_BUCKETS)  # kind: prefill, decode, mixed
WORKER_REQUESTS = Counter("crescent_worker_requests_total", "Requests finished by outcome.", ["role", "outcome"])
WORKER_MODEL_VERSION = Gauge("crescent_worker_model_version_info", "Model version being served (value 1).",
                             ["role", "version"])

# --- kvstore ------------------------------------------------------------------------------------------------------
STORE_BYTES_USED = Gauge("crescent_kvstore_bytes_used", "Bytes of blocks held, by tier.", ["tier"])
STORE_BYTES_CAPACITY = Gauge("crescent_kvstore_capacity_bytes", "Capacity by tier.", ["tier"])
STORE_BLOCKS = Gauge("crescent_kvstore_blocks", "Blocks held, by tier.", ["tier"])
STORE_BYTES_IN = Counter("crescent_kvstore_bytes_in_total", "Block bytes written by clients.", ["transport"])
STORE_BYTES_OUT = Counter("crescent_kvstore_bytes_out_total", "Block bytes read by clients.", ["transport"])
STORE_OPS = Counter("crescent_kvstore_operations_total", "Block operations by kind and result.",
                    ["op", "result"])  # op: get, put, lookup; result: hit, miss, ok, error
STORE_EVICTIONS = Counter("crescent_kvstore_evictions_total", "Blocks evicted (DRAM->SSD demotions and SSD drops).",
                          ["tier"])
STORE_PROMOTIONS = Counter("crescent_kvstore_promotions_total", "Blocks promoted from SSD to DRAM.")
STORE_CORRUPT = Counter("crescent_kvstore_corrupt_blocks_total", "Blocks that failed their checksum (served as misses).",
                        ["tier"])
STORE_TRANSFER_SECONDS = Histogram("crescent_kvstore_transfer_seconds", "One batched transfer, by transport and op.",
                                   ["transport", "op"], buckets=TRANSFER_BUCKETS)
STORE_CLIENT_ERRORS = Counter("crescent_kvstore_client_errors_total", "Bad frames, disconnects and refused requests.",
                              ["kind"])  # bad_frame, disconnect, draining, internal, conductor, ssd_write, unauthenticated
