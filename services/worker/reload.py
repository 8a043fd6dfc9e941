"""A worker's hot reload: load a newer published version beside the serving engine, swap, drain, retire.

The new version is validated (:class:`ModelWatcher`) and loaded in a thread while the old engine keeps serving.
The swap is one assignment on the event loop: requests that already hold the old engine finish on it (it has its
own KV cache, block-hash namespace and engine thread), new ones get the new engine, except at decode a request
whose prompt prefill computed on the old version (``kv_model_id``), which continues on it while it is loaded. The
old engine shuts down once its last request is done and ``reload_grace_s`` has passed (or after
``drain_timeout_s``), and its prefix cache goes with it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

from crescent.models.published import versioned_model_id
from crescent.services.common.model_watch import ModelWatcher, first_version


class ReloadTarget(Protocol):
    """What reloading needs from a worker runtime (services/worker/service.py's WorkerRuntime)."""

    settings: Any
    watcher: ModelWatcher | None

    def install(self, engine: Any) -> None: ...

    def users_of(self, engine: Any) -> int: ...

    def closing(self, engine: Any) -> None: ...

    def forget(self, engine: Any) -> None: ...

log = logging.getLogger(__name__)


def build_engine(settings: Any, watcher: ModelWatcher, version: Path) -> Any:
    """An LLMEngine of one version, hashing its blocks under ``<name>@<version>``."""
    from crescent.engine.llm_engine import LLMEngine

    update = {"model": str(version), "served_model_name": versioned_model_id(watcher.name, version.name)}
    return LLMEngine.from_settings(settings.model_copy(update=update))


async def _load(settings: Any, watcher: ModelWatcher, version: Path, *, at_start: bool = False) -> Any | None:
    """The loaded engine, or None after refusing a version that validates but does not load (or, after start,
    one that does not fit in memory beside the serving engine right now: that is retried)."""
    import torch

    try:
        return await asyncio.to_thread(build_engine, settings, watcher, version)
    except (MemoryError, torch.OutOfMemoryError) as exc:  # the machine's state, not the checkpoint's fault
        if at_start:
            raise
        log.warning("model %s: version %s does not fit in memory now (%s); retrying at the next poll",
                    watcher.name, version.name, exc)
        return None
    except Exception as exc:  # bad shapes, wrong dtypes, missing tensors: refuse it, keep what is served
        watcher.refuse(version, f"does not load: {type(exc).__name__}: {exc}")
        return None


async def load_first(settings: Any, watcher: ModelWatcher) -> Any:
    """The engine of the newest version that validates and loads (raises ValueError when none does)."""
    while True:
        version = await asyncio.to_thread(first_version, watcher)
        engine = await _load(settings, watcher, version, at_start=True)
        if engine is not None:
            watcher.accept(version)
            return engine


async def reload_once(runtime: ReloadTarget) -> bool:
    """Swap to a newer valid version if one is published; True when the runtime now serves it."""
    watcher = runtime.watcher
    assert watcher is not None, "reload_once needs a published model directory"
    version = await asyncio.to_thread(watcher.poll)
    if version is None:
        return False
    engine = await _load(runtime.settings, watcher, version)
    if engine is None:
        return False
    watcher.accept(version)
    runtime.install(engine)
    return True


async def watch_model(runtime: ReloadTarget, interval_s: float) -> None:
    """Poll for newer versions until cancelled; a failure is logged and the next poll tries again."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reload_once(runtime)
        except Exception:  # the watch must never take a serving worker down
            log.exception("model watch failed")


async def retire(runtime: ReloadTarget, old: Any, label: str, timeout_s: float, grace_s: float = 0.0) -> None:
    """Wait for the requests holding ``old`` to finish and for ``grace_s`` to pass (requests prefilled on this
    version may still arrive at decode), both bounded by ``timeout_s``; then shut it down."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    deadline, grace_end = now + timeout_s, now + min(grace_s, timeout_s)
    users = runtime.users_of(old)
    if users:
        log.info("draining %s: %d requests in flight", label, users)
    try:
        while (runtime.users_of(old) or loop.time() < grace_end) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if runtime.users_of(old):
            log.warning("drain of %s timed out: aborting %d requests", label, runtime.users_of(old))
    finally:
        runtime.closing(old)  # no await since the last check: no request can take it between the two
        await asyncio.to_thread(old.shutdown)
        runtime.forget(old)
        log.info("retired %s", label)
