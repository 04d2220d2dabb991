"""RFC 9457 problem details: the one place where errors become HTTP responses or WS messages."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from starlette.responses import Response

from service.errors import CarryoverError

PROBLEM_TYPE_BASE = "https://carryover.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
DEFAULT_RETRY_AFTER_S = 1  # a 503 always says when to come back

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
