"""Pure-ASGI middleware around every HTTP request: request id, body size limit, metrics, access
log, and the last-resort 500.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming responses keep streaming; ``websocket`` and
``lifespan`` scopes pass straight through untouched.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from contextvars import ContextVar

from prometheus_client import Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import http_problem, problem, problem_response
from service.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLIENT_CLOSED_REQUEST = 499  # status recorded (never sent) for a client that left mid-request
UNMATCHED_ROUTE = "unmatched"  # label of requests no route matched (never the raw path: unbounded)

log = logging.getLogger(__name__)
access_log = logging.getLogger("service.access")

# The current request's id, for log lines written while handling it (see ``RequestIdLogFilter``).
request_id_var: ContextVar[str | None] = ContextVar("carryover_request_id", default=None)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body is known to exceed the limit. An ``HTTPException``
    so that FastAPI's own body parsing re-raises it instead of turning it into a 400.

    The 413 keeps the connection open on purpose: uvicorn discards (never buffers) the rest of
    a body whose response is complete, so a client still uploading reads the 413, where closing
    early would reset the connection under it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes (setting max_body_bytes)")


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` (or ``-``) to every record; attach it to a handler to put the id
    into every log line written while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


def request_id_of(scope: Scope) -> str | None:
    """The id this middleware gave the request (also at ``request.state.request_id``)."""
    value = scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def route_template(scope: Scope) -> str:
    """The matched route's path template, e.g. ``/v1/sessions/{session_id}/step``."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


def _request_headers(scope: Scope) -> tuple[str, int | None]:
    """The request's ``X-Request-ID`` ("" if none) and declared Content-Length, in one pass
    over the raw headers (names arrive lower-cased; the first of each wins, as in Starlette)."""
    request_id: bytes | None = None
    length: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"x-request-id" and request_id is None:
            request_id = value
        elif name == b"content-length" and length is None:
            length = value
    declared = int(length) if length is not None and length.isdigit() else None
    return (request_id.decode("latin-1") if request_id is not None else ""), declared


class RequestIds:
    """Generated request ids: 16 random hex digits per process, then a 16-digit counter (32 hex
    digits in all, unique across workers and replicas; cheaper than a uuid4 per request)."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


class RequestContextMiddleware:
    """Per HTTP request: an ``X-Request-ID`` (the client's if sane, else ``RequestIds``) in the
    scope state and on the response; the body limit (``max_body_bytes``: by Content-Length before
    any byte is read, and while the body streams in); one access log line and the request
    metrics, labelled by route template (the line can be turned off: ``access_log``); and a
    problem+json 500 for an unexpected exception."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics, access_log: bool = False) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.access_log = access_log  # setting access_log: the line, not the metrics
        self.ids = RequestIds()
        # Labelled children by (route, method, status) and route: a ``labels()`` lookup per
        # request (lock, tuple, dict) is a visible share of the CPU at high request rates.
        self._counted: dict[tuple[str, str, str], Counter] = {}
        self._timed: dict[str, Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id, declared = _request_headers(scope)
        if not SANE_REQUEST_ID.fullmatch(request_id):
            request_id = self.ids.next()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        limit = self.max_body_bytes
        received = 0
        status = 500
        response_started = False

        async def receive_limited() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit)  # before reading a byte of it
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                out = MutableHeaders(scope=message)
                out[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive_limited, send_with_id)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            if not response_started:
                status = CLIENT_CLOSED_REQUEST
        except Exception as e:
            if response_started:
                log.exception("error after the response started (request_id=%s)", request_id)
                raise
            if isinstance(e, HTTPException):  # only if it escaped the exception handlers
                body = http_problem(e.status_code, str(e.detail))
            else:
                log.exception("unhandled error in %s %s (request_id=%s)", scope["method"], scope["path"], request_id)
                body = problem(
                    500,
                    "internal",
                    "Internal error",
                    f"an unexpected error occurred; the server log has details under request id {request_id}",
                )
            await problem_response({**body, "request_id": request_id})(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        route = route_template(scope)
        key = (route, method, str(status))
        if (counted := self._counted.get(key)) is None:
            counted = self._counted[key] = self.metrics.requests.labels(*key)
        if (timed := self._timed.get(route)) is None:
            timed = self._timed[route] = self.metrics.request_latency.labels(route)
        counted.inc()
        timed.observe(seconds)
        if not self.access_log:
            return
        access_log.info(
            "method=%s route=%s path=%s status=%d duration_ms=%.2f request_id=%s",
            method,
            route,
            scope["path"],
            status,
            seconds * 1000,
            request_id,
            extra={
                "request_id": request_id,
                "method": method,
                "route": route,
                "path": scope["path"],
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            },
        )
