"""The gateway follows a published model directory: new versions' tokenizer and block-hash namespace."""

from __future__ import annotations

import asyncio
import logging

from crescent.services.common.model_watch import ModelWatcher
from crescent.services.gateway.tokens import load_encoder

log = logging.getLogger(__name__)


async def watch_gateway_model(state) -> None:
    """The gateway's side (``state``: its GatewayState): follow new versions so prompts are hashed in the
    newest namespace, and take the new version's tokenizer. Until the workers have loaded that version, the only
    cost of hashing ahead is a missed cache-aware placement: the workers hash prompts themselves."""
    watcher: ModelWatcher = state.model_watch
    while True:
        await asyncio.sleep(state.settings.model_watch_interval_s)
        try:
            path = await asyncio.to_thread(watcher.poll)
            if path is None:
                continue
            try:
                encoder, _ = await asyncio.to_thread(load_encoder, str(path), state.settings.max_model_len)
            except Exception as exc:  # validated yet unreadable: the workers will refuse it too
                watcher.refuse(path, f"tokenizer does not load: {type(exc).__name__}: {exc}")
                continue
            state.encoder = encoder
            watcher.accept(path)
        except Exception:  # the watch must never take the gateway down
            log.exception("model watch failed")
