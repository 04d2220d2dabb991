"""RFC 9457 problem details: the one place where errors become HTTP responses or WS messages."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from service.errors import CarryoverError

PROBLEM_TYPE_BASE = "https://carryover.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem(status: int, code: str, title: str, detail: str, *, request_id: str | None = None,
            **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + code, "title": title, "status": status,
                            "detail": detail, "code": code}
    if request_id:
        body["request_id"] = request_id
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def error_problem(error: CarryoverError, request_id: str | None = None) -> dict[str, Any]:
    return problem(error.status, error.code, error.title, error.detail, request_id=request_id, **error.extra)


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    out = dict(headers or {})
    retry_after = body.get("retry_after")
    if retry_after is not None:
        out["Retry-After"] = str(max(1, round(float(retry_after))))
    return Response(orjson.dumps(body), status_code=int(body["status"]), media_type=PROBLEM_MEDIA_TYPE,
                    headers=out)
