"""AsyncEngine: the engine's step loop in one dedicated thread, fed and drained from asyncio.

The thread is the only one that touches the engine. Everything else reaches it through commands that run between
steps (``call``), and results come back to each request's asyncio queue with ``call_soon_threadsafe``. When there
is nothing to do the thread waits on a condition (no busy polling).

It implements the engine interface (interface.py) with ``kv_handoff == "blocks"``: the worker services move KV
blocks between this engine and the kvstore themselves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from crescent.engine.interface import KvHandoff, StepObserver, StoreParams
from crescent.engine.llm_engine import LLMEngine
from crescent.engine.outputs import EngineStats, RequestOutput
from crescent.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineError(RuntimeError):
    """A request failed inside the engine (its step raised); other requests go on."""


class AsyncEngine:
    kv_handoff: KvHandoff = "blocks"

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cv = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats: EngineStats = engine.stats()

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="crescent-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for rid in list(self._streams):  # nobody will step these any more
            self._deliver(RequestOutput(rid, finished=True, finish_reason="abort", error="engine shut down"))

    # --- the interface's fixed attributes (immutable in the engine: read without entering its thread) ---------------
    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def eos_token_ids(self) -> set[int]:
        return self.engine.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_block_shape(self) -> tuple[int, ...]:
        cfg = self.engine.config
        return (cfg.num_hidden_layers, 2, self.engine.block_manager.block_size, cfg.num_key_value_heads,
                cfg.head_dim)

    @property
    def kv_dtype(self) -> Any:
        return self.engine.runner.dtype

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the engine thread --------------------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        with self._cv:
            self._commands.append(command)
            self._cv.notify()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._stopping and not self._commands and not engine.has_unfinished_requests():
                    self._cv.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                try:
                    command()
                except Exception:  # a fire-and-forget command (an abort) must not kill the loop
                    log.exception("engine command failed")
            self._stats = engine.stats()
            if engine.has_unfinished_requests():
                self._step()
                if engine.stalled:  # nothing fits until a command (release, abort) frees blocks: don't spin
                    with self._cv:
                        if not self._commands and not self._stopping:
                            self._cv.wait(timeout=0.05)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug outside the forward pass: fail what is in flight, keep the loop alive
            log.exception("engine step raised; failing %d in-flight requests", len(self.engine.requests))
            outputs = []
            for rid in list(self.engine.requests):
                try:
                    out = self.engine.abort_request(rid)
                except Exception:
                    log.exception("abort of %s failed", rid)
                    out = None
                out = out or RequestOutput(rid, finished=True, finish_reason="abort")
                out.error = f"{type(exc).__name__}: {exc}"
                outputs.append(out)
        self._stats = self.engine.stats()  # before the outputs: a finished stream is no longer counted
        self._deliver(*outputs)

    def _deliver(self, *outputs: RequestOutput) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop and step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody listens any more
                for _, out in items:
                    self._streams.pop(out.request_id, None)

    # --- asyncio side -------------------------------------------------------------------------------------------
    def latest_stats(self) -> EngineStats:
        """The engine's load as of its last step or command, without waiting for the step in progress: heartbeats
        read this, so a multi-second prefill never makes a busy worker look dead."""
        return self._stats

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` in the engine thread between two steps and return its result (or raise its error)."""
        if not self.running:
            raise RuntimeError("the engine loop is not running: call start() first")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(setter: Callable[[Any], None], value: Any) -> None:
            if not future.done():
                setter(value)

        def command() -> None:
            try:
                result = fn(self.engine)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, future.set_exception, exc)
            else:
                loop.call_soon_threadsafe(settle, future.set_result, result)

        self._submit(command)
        return await future

    def observe_steps(self, observer: StepObserver | None) -> None:
        self.engine.step_observer = observer

    async def abort(self, request_id: str) -> None:
        if self.running:
            self._submit(lambda: self.engine.abort_request(request_id))

    async def cached_prefix_blocks(self, hashes: list[int]) -> int:
        return await self.call(lambda e: e.cached_prefix_blocks(hashes))

    async def take_held_blocks(self, request_id: str) -> tuple[list[int], list[Any]]:
        try:
            return await self.call(lambda e: e.export_request_blocks(request_id))
        finally:
            await self.call(lambda e: e.release(request_id))

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                       store: StoreParams | None = None, **add_request_kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iterator early (or cancelling its task) aborts the request.
        ``store`` is ignored: this engine's KV moves through the services (``import_kv``, ``take_held_blocks``)."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = added = False
        try:
            if params.response_format:  # compile (and load xgrammar) here, not between two steps of the batch
                await asyncio.to_thread(self.engine.grammars.compile, params.response_format)
            await self.call(lambda e: e.add_request(request_id, prompt_ids, params, **add_request_kwargs))
            added = True
            while not finished:
                out = await queue.get()
                # A consumer that fell behind (a slow client, a busy event loop) gets every queued step at once;
                # one that keeps up never waits for a second token.
                while not queue.empty() and not out.finished and out.error is None:
                    out = out.merge(queue.get_nowait())
                if out.error is not None:
                    finished = True
                    raise EngineError(f"request {request_id} failed: {out.error}")
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if added and not finished and self.running:
                self._submit(lambda: self.engine.abort_request(request_id))


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
