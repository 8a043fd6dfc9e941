"""In-process fake conductor/prefill/decode gRPC servers (sync grpc) for the gateway's API tests.

They speak the real protos over real sockets, so the gateway's gRPC client, SSE relay, cancellation and error paths
are exercised without a model. The decode fake "generates" a fixed text one character per token.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

from crescent.proto.v1 import (
    common_pb2,
    conductor_pb2,
    conductor_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)

REPLY = "Hello world, this is crescent."


class CharTokenizer:
    """Token id = Unicode code point; enough to check the gateway's plumbing."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]  # 1: a stand-in BOS

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class FakeCluster(conductor_pb2_grpc.ConductorServicer, prefill_pb2_grpc.PrefillServicer,
                  decode_pb2_grpc.DecodeServicer):
    def __init__(self) -> None:
        self.reset()
        self.finished: list[conductor_pb2.FinishRequest] = []
        self.placed: list[conductor_pb2.PlaceRequest] = []
        self.cancelled: list[str] = []
        self.seeds: list[int] = []
        self.sampling: list[common_pb2.SamplingParams] = []  # as prefill received them
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        conductor_pb2_grpc.add_ConductorServicer_to_server(self, self.server)
        prefill_pb2_grpc.add_PrefillServicer_to_server(self, self.server)
        decode_pb2_grpc.add_DecodeServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        """The behaviour knobs back to their defaults (tests that change one call this after)."""
        self.reject_reason = ""
        self.fail_decode_after = -1   # >= 0: abort the stream with an error after this many tokens
        self.token_delay_s = 0.0
        self.reply = REPLY  # what decode "generates", one character per token

    def start(self) -> FakeCluster:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)

    # conductor
    def ListInstances(self, request, context):
        def inst(role):
            return conductor_pb2.InstanceStatus(instance=conductor_pb2.InstanceInfo(role=role, address=self.address))
        return conductor_pb2.ListInstancesResponse(instances=[inst(common_pb2.ROLE_PREFILL),
                                                              inst(common_pb2.ROLE_DECODE)])

    def Place(self, request, context):
        with self.lock:
            self.placed.append(request)
        if self.reject_reason:
            return conductor_pb2.PlaceResponse(accepted=False, reject_reason=self.reject_reason, retry_after_s=2.0)
        info = conductor_pb2.InstanceInfo(address=self.address, data_address="127.0.0.1:1", transport="tcp")
        return conductor_pb2.PlaceResponse(accepted=True, prefill=info, decode=info, kvstore=info)

    def Finish(self, request, context):
        with self.lock:
            self.finished.append(request)
        return common_pb2.Ack()

    # prefill
    def Prefill(self, request, context):
        with self.lock:
            self.seeds.append(request.sampling.seed if request.sampling.HasField("seed") else -1)
            self.sampling.append(request.sampling)
        first = ord(self.reply[0])
        return prefill_pb2.PrefillResponse(first_token_id=first, computed_tokens=len(request.prompt_token_ids),
                                           first_logprob=_logprob(first, request.sampling.logprobs))

    # decode
    def Generate(self, request, context):
        params = request.sampling
        n_prompt = len(request.prompt_token_ids)
        reply = self.reply
        text, reason = reply[: params.max_tokens], common_pb2.FINISH_REASON_LENGTH
        if params.max_tokens >= len(reply):
            reason = common_pb2.FINISH_REASON_STOP
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, reason = text[:cut], common_pb2.FINISH_REASON_STOP
        state = {"done": False}

        def on_end() -> None:  # fires when the RPC ends; not done = the client cancelled it
            if not state["done"]:
                with self.lock:
                    self.cancelled.append(request.request_id)

        context.add_callback(on_end)
        for i, ch in enumerate(text):
            if i == self.fail_decode_after:
                state["done"] = True
                context.abort(grpc.StatusCode.INTERNAL, "decode worker crashed")
            if not context.is_active():
                return
            last = i == len(text) - 1
            state["done"] = last
            yield decode_pb2.GenerateChunk(
                token_ids=[ord(ch)], text=ch, logprobs=[_logprob(ord(ch), params.logprobs)] if params.logprobs >= 0
                else [], finish_reason=reason if last else 0, prompt_tokens=n_prompt, completion_tokens=i + 1)
            time.sleep(self.token_delay_s)
        if not text:
            state["done"] = True
            yield decode_pb2.GenerateChunk(finish_reason=reason, prompt_tokens=n_prompt)


def _logprob(token_id: int, top: int) -> common_pb2.TokenLogprob | None:
    if top < 0:
        return None
    alts = [common_pb2.TopLogprob(token_id=token_id, logprob=-0.5)] + [
        common_pb2.TopLogprob(token_id=ord("a") + k, logprob=-2.0 - k) for k in range(max(0, top - 1))]
    return common_pb2.TokenLogprob(token_id=token_id, logprob=-0.5, top=alts)
