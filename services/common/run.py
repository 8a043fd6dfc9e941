"""The process entry point every gRPC service shares: logging, the metrics port, SIGTERM/SIGINT, asyncio.run.

A service hands :func:`run_service` a coroutine ``main(stop)`` that serves until ``stop`` is set and then drains.
A failure while starting (a model that does not load, a data dir in use, a port taken) is one clear log line and
exit status 1, never a traceback: ``crescent up``'s supervisor and Kubernetes read the status and restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from crescent.services.common.auth import warn_if_open
from crescent.services.common.grpc_util import start_metrics_server
from crescent.services.common.logging import setup_logging
from crescent.settings import CrescentSettings

log = logging.getLogger(__name__)

ServiceMain = Callable[[asyncio.Event], Awaitable[None]]


def run_service(name: str, settings: CrescentSettings, main: ServiceMain, *, metrics_port: int = 0,
                fast_exit: bool = False) -> None:
    """Run ``main(stop)`` until SIGTERM/SIGINT sets ``stop``; ``metrics_port`` > 0 serves /metrics.

    ``fast_exit``: leave with ``os._exit`` once ``main`` returned (everything is closed by then). A worker's
    interpreter teardown (torch and friends) takes seconds on a busy machine and would stall an ordered shutdown.
    """
    setup_logging(name, settings.log_level)
    warn_if_open(settings.internal_token_value(), name)
    if metrics_port:
        start_metrics_server(settings.host, metrics_port)

    async def guarded() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    status = 0
    try:
        asyncio.run(guarded())
    except Exception as exc:  # one clear line, not a traceback
        log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
        status = 1
    logging.shutdown()
    if fast_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        raise SystemExit(status)
