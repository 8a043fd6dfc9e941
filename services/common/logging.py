"""One log format for every crescent process: time, service, level, logger, message (one line each)."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname).1s {service} %(name)s: %(message)s"


def setup_logging(service: str, level: str = "info") -> logging.Logger:
    """Configure the root logger once for this process and return the service's logger."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(service=service)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # uvicorn's and grpc's own loggers are chatty at info; keep them at warning unless debugging.
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    return logging.getLogger(f"crescent.{service}")
