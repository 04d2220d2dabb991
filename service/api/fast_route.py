"""``POST /v1/sessions/{id}/step``, the hot route, served as pure ASGI instead of through
FastAPI's router.

At 256 HTTP sessions FastAPI's per-request machinery (routing, dependency solving, the
exception and exit-stack middleware, the request/response wrappers) was about 40 % of the
server's CPU and the route's own work about 10 % (docs/bench, flame-http-before.svg). This
middleware answers that one path itself with the same parts the FastAPI route uses: the same
Bearer parsing (``BEARER``) and ``authenticate`` (owner + rate limit), the route's own handler
(``http.step_reply``: body, parsing, reply) and the same problem handlers
(``problems.error_response``). It sits inside ``RequestContextMiddleware``, so request ids, the
body limit, the access log and the metrics are unchanged; ``scope["route"]`` is the FastAPI
route, so the metrics' route label is too. Anything else (another path or method, an app under
a ``root_path``) goes on to FastAPI, where the route stays for OpenAPI.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import BEARER, authenticate
from service.api.problems import error_response
from service.errors import CarryoverError

Handler = Callable[[Request, str], Awaitable[Response]]


class FastRoute:
    """Serve ``POST`` on ``route``'s path (one ``{param}`` segment) with ``handler(request, param)``."""

    def __init__(self, app: ASGIApp, *, route: BaseRoute, handler: Handler) -> None:
        self.app = app
        self.route = route
        self.handler = handler
        path: str = getattr(route, "path")  # noqa: B009 - BaseRoute has no path, APIRoute has
        prefix, rest = path.split("{", 1)
        self.param, suffix = rest.split("}", 1)
        # Starlette's own rule for a str path parameter: one non-empty segment (already decoded).
        self.pattern = re.compile(re.escape(prefix) + "([^/]+)" + re.escape(suffix))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope.get("root_path")
            or (match := self.pattern.fullmatch(scope["path"])) is None
        ):
            await self.app(scope, receive, send)
            return
        value = match.group(1)
        scope["route"] = self.route
        scope["path_params"] = {self.param: value}
        request = Request(scope, receive)
        try:
            await authenticate(request, await BEARER(request))
            response = await self.handler(request, value)
        except (CarryoverError, HTTPException) as e:
            response = await error_response(request, e)
        await response(scope, receive, send)
