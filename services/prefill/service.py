"""The Prefill RPC: reuse what the worker or the store already holds, compute the rest, publish the new blocks.

Store trouble never fails a request: a failed load computes locally, a failed put only means decode recomputes.
"""

from __future__ import annotations

import logging
import time

import grpc

from crescent.engine.async_engine import EngineError
from crescent.engine.interface import StoreParams
from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import prefill_pb2, prefill_pb2_grpc
from crescent.services.common import metrics as m
from crescent.services.worker.service import WorkerRuntime, logprob_to_proto, sampling_from_proto

log = logging.getLogger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, runtime: WorkerRuntime):
        self.rt = runtime

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        async with self.rt.serving(context) as engine:  # the whole request runs on one model version
            try:
                reply = await self._prefill(engine, request, context)
                m.WORKER_REQUESTS.labels("prefill", "ok").inc()
                return reply
            except (ValueError, KeyError) as exc:
                m.WORKER_REQUESTS.labels("prefill", "bad_request").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineError as exc:
                m.WORKER_REQUESTS.labels("prefill", "error").inc()
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    async def _prefill(self, engine, request, context) -> prefill_pb2.PrefillResponse:
        started = time.perf_counter()
        rid = request.request_id or f"prefill-{id(request)}"
        ids = list(request.prompt_token_ids)
        params = sampling_from_proto(request.sampling)
        # Only the first token is sampled here (the sampler ignores stop rules, so it is decode's token 0 too).
        params.max_tokens, params.min_tokens = 1, 0
        store = (request.kvstore_address, request.kvstore_transport)
        if engine.kv_handoff == "blocks":
            final, moved = await self._run_moving_blocks(engine, rid, ids, params, store)
        else:
            final, moved = await self._run_in_engine(engine, rid, ids, params, store)
        loaded, full_hashes, stored = moved
        cached = max(0, final.cached_tokens - loaded)
        computed = len(ids) - final.cached_tokens
        m.WORKER_STORE_HITS.labels("prefill").inc(loaded)
        m.WORKER_PROMPT_TOKENS.labels("prefill").inc(computed)
        m.WORKER_GENERATION_TOKENS.labels("prefill").inc(1)
        reply = prefill_pb2.PrefillResponse(first_token_id=final.token_ids[0], cached_tokens=cached,
                                            loaded_tokens=loaded, computed_tokens=computed,
                                            block_hashes=full_hashes if stored >= 0 else [],
                                            stored_blocks=max(0, stored), prefill_s=time.perf_counter() - started,
                                            kv_model_id=engine.model_id)
        if final.new_logprobs:
            reply.first_logprob.CopyFrom(logprob_to_proto(final.new_logprobs[-1]))
        return reply

    async def _run_moving_blocks(self, engine, rid: str, ids: list[int], params, store: tuple[str, str]):
        """crescent's engine: this service moves the KV blocks. (final output, (loaded tokens, the prompt's full
        block hashes, blocks the store now holds of them or -1 when the put failed))."""
        bs = self.rt.settings.kv_block_size
        model_id = engine.model_id  # the engine's own version namespace, never a newer one's
        hashes = prefix_block_hashes(ids, bs, model_id)
        in_store, import_kv = await self._fetch_from_store(engine, store, model_id, hashes)
        loaded_blocks = len(import_kv[0]) if import_kv else 0
        # import_kv admits the loaded blocks in the same engine turn as the request: no step can evict them first.
        final = await _final(engine.generate(rid, ids, params, hold_kv=True, import_kv=import_kv), rid)
        full_hashes, blocks = await engine.take_held_blocks(rid)
        stored = await self._store_new(engine, store, model_id, full_hashes, blocks, in_store)
        if self.rt.link:
            await self.rt.link.report_stored(model_id, full_hashes)
        return final, (loaded_blocks * bs, full_hashes, stored)

    async def _run_in_engine(self, engine, rid: str, ids: list[int], params, store: tuple[str, str]):
        """An engine that keeps or moves its KV itself (vLLM): with a connector, it loads the stored prefix and
        saves the prompt's blocks, and reports what it did on the final output; without one the KV stays in the
        engine's prefix cache (an aggregated worker's decode reuses it) and the store holds none of it."""
        model_id = engine.model_id
        use_store = bool(store[0]) and engine.kv_handoff == "connector"
        params_store = StoreParams(store[0], store[1], model_id, load=True, save=True) if use_store else None
        final = await _final(engine.generate(rid, ids, params, store=params_store), rid)
        report = final.kv_transfer_params or {}
        if report.get("error"):  # the store is an optimisation: what failed was computed instead
            log.warning("request %s: KV connector: %s", rid, report["error"])
        hashes = [int(h) for h in report.get("block_hashes", [])]
        if not use_store:
            hashes = prefix_block_hashes(ids, self.rt.settings.kv_block_size, model_id)
            if self.rt.link:  # the engine's prefix cache holds them (the connector reports its own blocks)
                await self.rt.link.report_stored(model_id, hashes)
            return final, (0, hashes, -1)
        return final, (int(report.get("loaded_tokens", 0)), hashes, int(report.get("stored_blocks", len(hashes))))

    async def _fetch_from_store(self, engine, store: tuple[str, str], model_id: str, hashes: list[int]):
        """(blocks the store holds, (hashes, blocks) this worker lacks and fetched, or None)."""
        if not store[0] or not hashes:
            return 0, None
        try:
            local = await engine.cached_prefix_blocks(hashes)
            in_store = await self.rt.kv_transfer(engine).lookup(*store, model_id, hashes)
            if in_store <= local:
                return in_store, None
            blocks = await self.rt.kv_transfer(engine).get(*store, model_id, hashes[local:in_store])
        except Exception as exc:  # the store is an optimisation: compute instead
            log.warning("kvstore load failed (%s); computing the prompt", exc)
            return 0, None
        return in_store, ((hashes[local:local + len(blocks)], blocks) if blocks else None)

    async def _store_new(self, engine, store: tuple[str, str], model_id: str, hashes: list[int], blocks,
                         in_store: int) -> int:
        """Put the blocks the store lacks; -1 when the put failed (decode must then recompute)."""
        if not store[0]:
            return -1
        try:
            return await self.rt.kv_transfer(engine).put(*store, model_id, hashes[in_store:], blocks[in_store:])
        except Exception as exc:
            log.warning("kvstore put failed (%s); decode will recompute", exc)
            return -1


async def _final(stream, rid: str):
    """The last output of a stream that must produce a token."""
    final = None
    async for out in stream:
        final = out
    if final is None or not final.token_ids:
        raise EngineError(f"request {rid} produced no token")
    return final
