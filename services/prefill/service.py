"""The Prefill RPC: reuse what the worker or the store already holds, compute the rest, publish the new blocks.

Store trouble never fails a request: a failed load computes locally, a failed put only means decode recomputes.
"""

from __future__ import annotations

import logging
import time

import grpc

from crescent.engine.async_engine import EngineError
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
        bs = self.rt.settings.kv_block_size
        model_id = engine.engine.model_id  # the engine's own version namespace, never a newer one's
        hashes = prefix_block_hashes(ids, bs, model_id)
        store = (request.kvstore_address, request.kvstore_transport)
        in_store, import_kv = await self._fetch_from_store(engine, store, model_id, hashes)
        loaded_blocks = len(import_kv[0]) if import_kv else 0

        final = None
        # import_kv admits the loaded blocks in the same engine turn as the request: no step can evict them first.
        async for out in engine.generate(rid, ids, params, hold_kv=True, import_kv=import_kv):
            final = out
        if final is None or not final.token_ids:
            raise EngineError(f"request {rid} produced no token")
        try:
            full_hashes, blocks = await engine.call(lambda e: e.export_request_blocks(rid))
        finally:
            await engine.call(lambda e: e.release(rid))
        stored = await self._store_new(engine, store, model_id, full_hashes, blocks, in_store)
        if self.rt.link:
            await self.rt.link.report_stored(model_id, full_hashes)

        loaded = loaded_blocks * bs
        cached = max(0, final.cached_tokens - loaded)
        computed = len(ids) - final.cached_tokens
        m.WORKER_STORE_HITS.labels("prefill").inc(loaded)
        m.WORKER_PROMPT_TOKENS.labels("prefill").inc(computed)
        m.WORKER_GENERATION_TOKENS.labels("prefill").inc(1)
        reply = prefill_pb2.PrefillResponse(first_token_id=final.token_ids[0], cached_tokens=cached,
                                            loaded_tokens=loaded, computed_tokens=computed,
                                            block_hashes=full_hashes if stored >= 0 else [],
                                            stored_blocks=max(0, stored), prefill_s=time.perf_counter() - started,
                                            kv_model_id=model_id)
        if final.new_logprobs:
            reply.first_logprob.CopyFrom(logprob_to_proto(final.new_logprobs[-1]))
        return reply

    async def _fetch_from_store(self, engine, store: tuple[str, str], model_id: str, hashes: list[int]):
        """(blocks the store holds, (hashes, blocks) this worker lacks and fetched, or None)."""
        if not store[0] or not hashes:
            return 0, None
        try:
            local = await engine.call(lambda e: e.cached_prefix_blocks(hashes))
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
