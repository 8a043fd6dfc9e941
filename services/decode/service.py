"""The Generate stream: the first token's chunk at once, then the KV from the store, then the continuous batch.

The first token (sampled by prefill) is sent before any KV moves, so the client's TTFT is prefill's. Decode then
imports the prompt's stored blocks and adds the request with ``forced_output_ids=[first]``: the prompt tail that
is not in a full block and the first token are recomputed here. Block hashes are recomputed from the prompt (never
trusted from the wire), so a bad request cannot plant foreign KV in the prefix cache. An engine that moves KV
itself (vLLM with CrescentConnector) gets the store's address per request instead, and loads the blocks in its
own forward pass.
"""

from __future__ import annotations

import logging

import grpc

from crescent.engine.async_engine import EngineError
from crescent.engine.detokenizer import IncrementalDetokenizer
from crescent.engine.interface import StoreParams
from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from crescent.services.common import metrics as m
from crescent.services.worker.service import WorkerRuntime, logprob_to_proto, sampling_from_proto

log = logging.getLogger(__name__)

_GENERATED_DECODE = m.WORKER_GENERATION_TOKENS.labels("decode")  # looked up once, not per chunk
FINISH = {None: common_pb2.FINISH_REASON_UNSPECIFIED, "stop": common_pb2.FINISH_REASON_STOP,
          "length": common_pb2.FINISH_REASON_LENGTH, "abort": common_pb2.FINISH_REASON_ABORT}


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, runtime: WorkerRuntime):
        self.rt = runtime

    async def Generate(self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        outcome = "cancelled"
        # the whole stream runs on one model version: the one prefill computed the prompt on, while it is loaded
        async with self.rt.serving(context, request.kv_model_id) as engine:
            try:
                async for chunk in self._generate(engine, request):
                    yield chunk
                outcome = "ok"
            except ValueError as exc:
                outcome = "bad_request"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineError as exc:
                outcome = "error"
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))
            finally:
                m.WORKER_REQUESTS.labels("decode", outcome).inc()

    async def _generate(self, engine, request: decode_pb2.GenerateRequest):
        ids = list(request.prompt_token_ids)
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        params = sampling_from_proto(request.sampling).validate()
        first = request.first_token_id
        if first >= engine.vocab_size:
            raise ValueError(f"first_token_id {first} is outside the vocabulary [0, {engine.vocab_size})")
        detok = IncrementalDetokenizer(engine.tokenizer, ids, params, engine.eos_token_ids)
        reason = detok.add(first)
        text = detok.pop_text()
        chunk = decode_pb2.GenerateChunk(token_ids=[first], text=text, finish_reason=FINISH[reason],
                                         prompt_tokens=len(ids), completion_tokens=1)
        if request.HasField("first_logprob") and params.logprobs is not None:
            chunk.logprobs.append(request.first_logprob)
        m.WORKER_GENERATION_TOKENS.labels("decode").inc(1)
        yield chunk
        if reason is not None:
            return
        rid = request.request_id or f"decode-{id(request)}"
        if engine.kv_handoff == "blocks":
            loaded, import_kv = await self._fetch_kv(engine, request, ids)
            stream = engine.generate(rid, ids, params, forced_output_ids=[first], import_kv=import_kv)
        else:  # the engine's connector loads the stored prompt itself (or its own prefix cache holds it)
            loaded, store = 0, None
            if request.kvstore_address and engine.kv_handoff == "connector":
                store = StoreParams(request.kvstore_address, request.kvstore_transport, engine.model_id, load=True)
            stream = engine.generate(rid, ids, params, forced_output_ids=[first], store=store)
        # The engine's first output repeats the forced first token and its text (its detokenizer has the same
        # state as ``detok`` above): skip what was sent. After that every output is a delta, sent as it is; the
        # engine merges the steps a slow consumer fell behind on into one output, so one chunk carries them all.
        skip_ids, skip_text = 1, len(text)
        generated = _GENERATED_DECODE
        # import_kv admits the blocks in the same engine turn as the request, so no step can evict them in between.
        async for out in stream:
            if out.kv_transfer_params:  # the connector says what it loaded once the request is done
                if out.kv_transfer_params.get("error"):
                    log.warning("request %s: KV connector: %s", rid, out.kv_transfer_params["error"])
                loaded = int(out.kv_transfer_params.get("loaded_tokens", loaded))
                m.WORKER_STORE_HITS.labels("decode").inc(loaded)
            new_ids, new_text, new_lp = out.new_token_ids, out.new_text, out.new_logprobs
            if skip_ids:
                new_ids, new_text, new_lp = new_ids[skip_ids:], new_text[skip_text:], new_lp and new_lp[skip_ids:]
                skip_ids = 0
            if not new_ids and not new_text and not out.finished:
                continue
            chunk = decode_pb2.GenerateChunk(token_ids=new_ids, text=new_text, finish_reason=FINISH[out.finish_reason],
                                             prompt_tokens=len(ids), completion_tokens=out.completion_tokens,
                                             loaded_tokens=loaded)
            if new_lp:
                chunk.logprobs.extend(logprob_to_proto(lp) for lp in new_lp)
            generated.inc(len(new_ids))
            yield chunk

    async def _fetch_kv(self, engine, request: decode_pb2.GenerateRequest, ids: list[int]):
        """The prompt's stored blocks this worker lacks: (prompt tokens loaded, (hashes, blocks) or None).

        Any store failure means (0, None): the store is an optimisation and the prompt is recomputed instead.
        """
        if not request.kvstore_address:
            return 0, None
        model_id = engine.model_id  # the engine's own version namespace, never a newer one's
        hashes = prefix_block_hashes(ids, self.rt.settings.kv_block_size, model_id)
        if request.block_hashes and list(request.block_hashes) != hashes[: len(request.block_hashes)]:
            log.warning("request %s: block hashes differ from the prompt's (model id mismatch?)", request.request_id)
        try:
            local = await engine.cached_prefix_blocks(hashes)
            if local >= len(hashes):
                return 0, None
            blocks = await self.rt.kv_transfer(engine).get(request.kvstore_address, request.kvstore_transport,
                                                           model_id, hashes[local:])
        except Exception as exc:  # the store is an optimisation: recompute the prompt instead
            log.warning("kvstore load failed (%s); recomputing the prompt", exc)
            return 0, None
        if not blocks:
            return 0, None
        loaded = len(blocks) * self.rt.settings.kv_block_size
        m.WORKER_STORE_HITS.labels("decode").inc(loaded)
        return loaded, (hashes[local:local + len(blocks)], blocks)
