"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from crescent.services.common.metrics import GATEWAY_REQUESTS

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
          504: "timeout_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (documented in the OpenAPI schema; the fuzz test holds us to it)."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": what} for status, what in (
        (400, "malformed or unsupported request; prompt too long (code context_length_exceeded)"),
        (401, "missing or wrong API key"), (404, "unknown model"), (413, "request body over max_body_bytes"),
        (429, "overloaded: retry after Retry-After seconds"), (503, "not ready or draining"))}
"""OpenAPI ``responses`` of the API routes."""

STREAM_RESPONSE: dict[int | str, dict] = {200: {"description": "JSON, or with stream=true an SSE stream",
                                                "content": {"application/json": {},
                                                            "text/event-stream": {}}}}


class ApiError(Exception):
    """An error the client sees as OpenAI error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = _utf8_safe(message)
        self.param = None if param is None else _utf8_safe(param)
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            # Retry-After is whole seconds; never 0, or clients hammer us.
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _utf8_safe(text: str) -> str:
    """Messages quote client input; a lone surrogate in it must not make the error JSON unencodable."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field_path(loc: tuple) -> str | None:
    """``messages.0.content`` from pydantic's location, without ``body`` and the union-branch labels it adds
    (``function-after[_utf8(), str]``, ``list[int]``) that mean nothing to a client."""
    parts = [str(p) for p in loc if p != "body" and (isinstance(p, int) or str(p).isidentifier())]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = _field_path(first.get("loc", ()))
    if param is None and first.get("type") == "missing":
        return "a JSON object is required as the request body", None
    if first.get("type") == "extra_forbidden":  # OpenAI's words for an unknown field
        return f"Unrecognized request argument supplied: {param}", param
    # a union (prompt: a string, or a list of strings, or of ids...) fails once per branch: say each way once
    field = (param or "").split(".")[0]
    paths = [_field_path(e.get("loc", ())) or "" for e in errors]
    reasons = list(dict.fromkeys(f"{path}: {e.get('msg')}" if path else str(e.get("msg"))
                                 for path, e in zip(paths, errors, strict=True) if path.split(".")[0] == field))
    return "; or ".join(reasons[:4]), param


_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_OUTCOMES = {400: "bad_request", 404: "not_found", 413: "bad_request", 429: "rejected", 503: "rejected"}


def count_outcome(path: str, status: int, model_name: str) -> None:
    """Count a failed API request under its endpoint (others, like /health, are not counted)."""
    endpoint = _ENDPOINTS.get(path)
    if endpoint is not None:
        GATEWAY_REQUESTS.labels(model_name=model_name, endpoint=endpoint,
                                outcome=_OUTCOMES.get(status, "error")).inc()


def _count(request: Request, status: int) -> None:
    count_outcome(request.url.path, status, request.app.state.gateway.model_id)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _count(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI says 422; OpenAI clients expect 400 for a malformed request.
        message, param = _validation_message(exc)
        _count(request, 400)
        return ApiError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        _count(request, 500)
        return ApiError(500, f"internal error: {type(exc).__name__}").response()
