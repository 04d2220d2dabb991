"""The one place where the error catalogue (``service/errors.py``) meets the wire: RFC 9457
problem details for HTTP (the exception handlers too), for WebSockets the error message and
the close code an error ends a connection with, and under ``/v2`` the Open Inference
Protocol's ``{"error": "..."}``."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.errors import (
    CarryoverError,
    IdleTimeout,
    InvalidJson,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    SessionNotFound,
    ShuttingDown,
    Unavailable,
)

log = logging.getLogger(__name__)

PROBLEM_TYPE_BASE = "https://carryover.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
DEFAULT_RETRY_AFTER_S = 1  # a 503 always says when to come back

# WebSocket close codes (RFC 6455 §7.4; 4xxx: 4000 + the HTTP status of the error).
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL, CLOSE_RESTART, CLOSE_TRY_AGAIN = 1008, 1009, 1011, 1012, 1013
RETRYABLE = (Overloaded, ShuttingDown, Unavailable, NotReady)  # outages: 1013, never 1011

# Code and title of the failures that Starlette / FastAPI raise by status (routing, parsing).
HTTP_PROBLEMS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "Bad request"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    422: ("invalid_input", "Invalid input"),
    429: ("too_many_requests", "Too many requests"),
    500: ("internal", "Internal error"),
    503: ("unavailable", "Service unavailable"),
}


def problem(
    status: int, code: str, title: str, detail: str, *, request_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request_id:
        body["request_id"] = request_id
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def error_problem(error: CarryoverError, request_id: str | None = None) -> dict[str, Any]:
    return problem(error.status, error.code, error.title, error.detail, request_id=request_id, **error.extra)


def http_problem(status: int, detail: str, *, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A problem for a bare HTTP status (404 no route, 405, 413, ...): code and title by status."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    code, title = HTTP_PROBLEMS.get(status, (f"http_{status}", phrase))
    return problem(status, code, title, detail, request_id=request_id, **extra)


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """The problem as ``application/problem+json``; 503s (and any problem with ``retry_after``)
    carry ``Retry-After`` in whole seconds."""
    out = dict(headers or {})
    retry_after = body.get("retry_after")
    if retry_after is None and body.get("status") == 503:
        retry_after = DEFAULT_RETRY_AFTER_S
    if retry_after is not None:
        out["Retry-After"] = str(max(1, round(float(retry_after))))
    return Response(orjson.dumps(body), status_code=int(body["status"]), media_type=PROBLEM_MEDIA_TYPE, headers=out)


# -- /v2 (Open Inference Protocol) -----------------------------------------------------------------
V2_PREFIX = "/v2"
V2_STATUS = {415: 400, 422: 400}  # the protocol answers every bad request with 400


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def v2_response(
    status: int, detail: str, retry_after: float | None = None, headers: dict[str, str] | None = None
) -> Response:
    """``{"error": detail}`` with the status the protocol uses; 503s carry ``Retry-After``."""
    status = V2_STATUS.get(status, status)
    out = dict(headers or {})
    if retry_after is None and status == 503:
        retry_after = DEFAULT_RETRY_AFTER_S
    if retry_after is not None:
        out["Retry-After"] = str(max(1, round(float(retry_after))))
    return Response(orjson.dumps({"error": detail}), status_code=status, media_type="application/json", headers=out)


# -- WebSocket -------------------------------------------------------------------------------------
def ws_error_message(error: CarryoverError, chunk_id: Any = None) -> str:
    """``{"type": "error", ...problem fields}``; the problem's ``type`` URI becomes ``problem_type``."""
    body = error_problem(error)
    message: dict[str, Any] = {"type": "error", "problem_type": body.pop("type"), **body}
    if chunk_id is not None:
        message["id"] = chunk_id
    return orjson.dumps(message).decode()


def ws_close_code(error: CarryoverError) -> int | None:
    """The close code a chunk's error ends the connection with, or ``None``: reply and go on."""
    if isinstance(error, RETRYABLE):
        return CLOSE_TRY_AGAIN
    if isinstance(error, PayloadTooLarge):
        return CLOSE_TOO_BIG
    if error.status in (401, 429):  # no or unknown key, a per-key limit: a policy close
        return CLOSE_POLICY
    if isinstance(error, SessionNotFound | IdleTimeout):  # 4404, 4408
        return 4000 + error.status
    if error.status >= 500:
        return CLOSE_INTERNAL
    return None


def ws_setup_close_code(error: CarryoverError) -> int:
    """The close code of a connection whose session could not be opened: always a close."""
    return ws_close_code(error) or 4000 + error.status


# -- HTTP exception handlers -----------------------------------------------------------------------
def _request_id(request: Request) -> str | None:
    value = getattr(request.state, "request_id", None)  # set by RequestContextMiddleware
    return value if isinstance(value, str) else None


async def _on_carryover_error(request: Request, exc: Exception) -> Response:
    if request.scope["type"] != "http" or not isinstance(exc, CarryoverError):
        raise exc  # a WebSocket's errors are its own transport's business
    if exc.status == 500:  # 503s are expected conditions, counted and in the access log
        log.error("%s %s: %s (request_id=%s)", request.method, request.url.path, exc.detail, _request_id(request))
    if is_v2(request.url.path):
        return v2_response(exc.status, exc.detail, exc.retry_after, dict(exc.headers))
    return problem_response(error_problem(exc, _request_id(request)), dict(exc.headers))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    if request.scope["type"] != "http" or not isinstance(exc, HTTPException):
        raise exc
    headers = dict(exc.headers or {})
    detail = str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.method} {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {headers.get('Allow', '')}"
    if is_v2(request.url.path):
        return v2_response(exc.status_code, detail, headers=headers)
    return problem_response(http_problem(exc.status_code, detail, request_id=_request_id(request)), headers)


def _where(loc: list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        return ".".join(parts[1:]) or "body"
    return f"{parts[0]} parameter {'.'.join(parts[1:])}" if len(parts) > 1 else ".".join(parts)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        raise exc
    rid = _request_id(request)
    errors = list(exc.errors())
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "")
        return problem_response(error_problem(InvalidJson(f"the body is not valid JSON: {reason}"), rid))
    items: list[dict[str, Any]] = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors
    ]
    detail = "; ".join(f"{_where(item['loc'])}: {item['msg']}" for item in items)
    if is_v2(request.url.path):
        return v2_response(400, detail)
    return problem_response(problem(422, "invalid_input", "Invalid input", detail, request_id=rid, errors=items))


async def error_response(request: Request, exc: Exception) -> Response:
    """What the installed handlers answer for ``exc`` (a ``CarryoverError`` or an
    ``HTTPException``), for code that runs outside FastAPI's exception middleware; anything
    else is re-raised."""
    if isinstance(exc, CarryoverError):
        return await _on_carryover_error(request, exc)
    return await _on_http_error(request, exc)


def install_problem_handlers(app: FastAPI) -> None:
    """Every HTTP failure as problem+json: the catalogue's errors, Starlette's HTTP errors
    (404 no route, 405, 413, ...) and FastAPI's request validation errors."""
    app.add_exception_handler(CarryoverError, _on_carryover_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
