"""Server-sent events framing for OpenAI streams: ``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import json

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return "data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def error_event(body: dict) -> str:
    """A failure after the stream began: the status line is long gone, so the error travels as an event."""
    return event(body)
