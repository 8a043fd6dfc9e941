"""CrescentConnector's scheduler half: store lookups, load and save orders, per-request reports.

Runs in vLLM's scheduler (the engine core process). It sees vLLM's ``Request`` and ``SchedulerOutput`` objects
but only reads plain fields of them (``request_id``, ``prompt_token_ids``, ``kv_transfer_params``; the scheduled
requests' block ids and token counts), so it imports nothing from vLLM.
"""

from __future__ import annotations

import logging
from typing import Any

from crescent.hashing import prefix_block_hashes
from crescent.services.worker.vllm_connector_io import StoreClients
from crescent.services.worker.vllm_connector_plan import (
    ConnectorConfig,
    ConnectorCounters,
    LoadSpec,
    RequestPlan,
    SaveSpec,
    TransferParams,
    loadable_tokens,
    slots_for,
)

log = logging.getLogger(__name__)


class ConnectorScheduler:
    def __init__(self, config: ConnectorConfig, page_size: int):
        self.config = config
        self.page_size = page_size  # vLLM's block size (tokens per page)
        self.store = StoreClients(config.internal_token, config.timeout_s)
        self.counters = ConnectorCounters()
        self.plans: dict[str, RequestPlan] = {}
        self._pending_loads: list[LoadSpec] = []

    # -- lookups ------------------------------------------------------------------------------------------------

    def _plan(self, request: Any) -> RequestPlan | None:
        plan = self.plans.get(request.request_id)
        if plan is not None:
            return plan
        prompt = list(request.prompt_token_ids or [])
        try:
            params = TransferParams.parse(request.kv_transfer_params)
        except (TypeError, ValueError) as err:  # never fail the engine on a bad request field: report it
            log.warning("request %s: %s; no KV transfer for it", request.request_id, err)
            plan = RequestPlan(TransferParams(), [], len(prompt), self.config.block_size, error=str(err))
            self.plans[request.request_id] = plan
            return plan
        if not params.active:
            return None
        hashes = prefix_block_hashes(prompt, self.config.block_size, params.model_id)
        plan = RequestPlan(params, hashes, len(prompt), self.config.block_size)
        self.plans[request.request_id] = plan
        return plan

    def _lookup(self, plan: RequestPlan, req_id: str) -> None:
        p = plan.params
        try:
            plan.stored_blocks = self.store.get(p.kvstore_address, p.kvstore_transport).lookup_prefix(
                p.model_id, plan.hashes)
        except Exception as err:  # store down or refusing us: compute everything, say why in the report
            self.store.drop(p.kvstore_address, p.kvstore_transport)
            plan.stored_blocks, plan.error = 0, f"kvstore lookup at {p.kvstore_address} failed: {err}"
            log.warning("request %s: %s", req_id, plan.error)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        plan = self._plan(request)
        if plan is None or not plan.params.active or not plan.hashes:
            return 0, False
        self._lookup(plan, request.request_id)
        if not plan.params.load:
            return 0, False
        hit = loadable_tokens(plan.prompt_len, plan.stored_blocks, self.config.block_size)
        plan.local_tokens = num_computed_tokens
        return max(hit - num_computed_tokens, 0), False  # loads are synchronous (before the step's forward)

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        plan = self.plans.get(request.request_id)
        if plan is None or not plan.params.load:
            return
        if not plan.counted:
            plan.counted = True
            self.counters.add("lookups")
            self.counters.add("lookup_misses", int(num_external_tokens == 0))
            self.counters.add("lookup_errors", int(bool(plan.error)))
        if num_external_tokens <= 0:
            return
        bs = self.config.block_size
        start, end = plan.local_tokens, plan.local_tokens + num_external_tokens
        p = plan.params
        self._pending_loads.append(LoadSpec(
            req_id=request.request_id, address=p.kvstore_address, transport=p.kvstore_transport,
            model_id=p.model_id, hashes=plan.hashes[start // bs:end // bs], skip=start % bs,
            slots=slots_for(block_ids, self.page_size, start, end), page_size=self.page_size))
        plan.loaded_tokens = num_external_tokens

    # -- per step -----------------------------------------------------------------------------------------------

    def build_orders(self, scheduler_output: Any) -> tuple[list[LoadSpec], list[SaveSpec]]:
        """This step's load orders (allocated since the last step) and save orders (blocks complete after it)."""
        loads, self._pending_loads = self._pending_loads, []
        saves: list[SaveSpec] = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            plan = self.plans.get(new.req_id)
            if plan is not None and plan.params.save:
                plan.block_ids = list(new.block_ids[0])
                self._save_order(new.req_id, plan, new.num_computed_tokens + scheduled.get(new.req_id, 0), saves)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            plan = self.plans.get(req_id)
            if plan is None or not plan.params.save:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after a preemption the list is the request's whole block list
                plan.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                plan.block_ids.extend(new_ids[0])
            self._save_order(req_id, plan, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), saves)
        return loads, saves

    def _save_order(self, req_id: str, plan: RequestPlan, computed: int, saves: list[SaveSpec]) -> None:
        first, last = plan.ready_to_save(computed)
        if last <= first:
            return
        bs, p = self.config.block_size, plan.params
        saves.append(SaveSpec(req_id=req_id, address=p.kvstore_address, transport=p.kvstore_transport,
                              model_id=p.model_id, hashes=plan.hashes[first:last],
                              slots=slots_for(plan.block_ids, self.page_size, first * bs, last * bs)))
        plan.next_save = last
        plan.stored_new += last - first

    def worker_results(self, results: dict[str, dict[str, Any]]) -> None:
        """What the worker half did (vLLM hands it back each step): failures correct the requests' reports."""
        for req_id, result in results.items():
            plan = self.plans.get(req_id)
            if plan is None:
                continue
            if "loaded_tokens" in result:
                plan.loaded_tokens = result["loaded_tokens"]
            if "stored_blocks" in result:  # the order counted all its blocks; the worker says how many it wrote
                plan.stored_new += result["stored_blocks"] - result["ordered_blocks"]
                plan.save_failed |= result["stored_blocks"] < result["ordered_blocks"]
            if result.get("error"):
                plan.error = result["error"]

    def request_finished(self, request: Any) -> dict[str, Any] | None:
        plan = self.plans.pop(request.request_id, None)
        return plan.report() if plan is not None else None

    def close(self) -> None:
        self.store.close()
