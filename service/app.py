"""Composition: builds the FastAPI app from the parts. No business logic here.

``app.state.carryover`` holds the typed ``AppState`` (``service.api.state``) for the app's
lifetime: settings, metrics, the ``SessionService`` once started, readiness, and the open
WebSocket streams. Its idempotent ``drain()`` is the one drain: the lifespan's shutdown calls it,
and so does ``service.serve.DrainingServer`` before uvicorn closes WebSockets itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api.auth import Auth, install_auth
from service.api.http import install_http
from service.api.page import install_page
from service.api.state import AppState, install_state
from service.api.v2 import install_v2
from service.api.ws import install_ws
from service.config import Settings
from service.engine.model import RecurrentModel
from service.metrics import Metrics
from service.sessions import SessionService
from service.store.embedded import redis_or_embedded
from service.store.store import SessionStore

log = logging.getLogger(__name__)


def load_models(settings: Settings) -> dict[str, RecurrentModel]:
    return {
        name: RecurrentModel(
            path,
            name=name,
            flags=settings.model_flags(name),
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            idle_spin=settings.idle_spin,
        )
        for name, path in settings.model_paths().items()
    }


def _store_address(url: str | None) -> str:
    """Where the store is, for the ready line (never the URL's password). ``carryover serve``
    passes the embedded Redis to its workers as a ``unix://`` URL."""
    if url is None:
        return "embedded Redis"
    parts = urlsplit(url)
    return f"Redis at {parts.path}" if parts.scheme == "unix" else f"Redis at {parts.hostname}:{parts.port or 6379}"


def create_app(settings: Settings | None = None, *, models: Mapping[str, RecurrentModel] | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings, Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = dict(models) if models is not None else load_models(settings)
        # No Redis URL: the app owns an embedded Redis, stopped after the store closes.
        async with redis_or_embedded(settings.redis_url, settings.data_dir) as redis_url:
            store = await SessionStore.connect(
                redis_url,
                socket_timeout_s=settings.redis_timeout_s,
                max_connections=settings.redis_max_connections,
            )
            sessions = SessionService(settings, store, served, state.metrics)
            await sessions.start()
            _reload_keys_on_sighup(auth)
            state.sessions, state.ready = sessions, True
            log.info(
                "carryover ready: models %s, store %s",
                sorted(served),
                _store_address(settings.redis_url),
            )
            try:
                yield
            finally:
                await state.drain()  # WebSockets: 1012, the client should reconnect elsewhere / later
                await sessions.stop()  # finishes queued and in-flight batches and their writes
                await store.close()
                log.info("carryover stopped")

    app = FastAPI(
        title="carryover",
        version="0.1.0",
        lifespan=lifespan,
        description="Streaming inference for recurrent models: per-session state in Redis, "
        "ragged micro-batching on ONNX Runtime.",
        # Metrics are Prometheus (/metrics). FastAPI's OpenTelemetry hook otherwise asks the
        # OTel providers (environment lookups) on every request: 5 % of the CPU at 256 HTTP
        # sessions (docs/bench). Older FastAPI versions take the keyword as an unused extra.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_state(app, state)
    auth = install_auth(app, settings)  # reads the key file now: a bad one fails here, not later
    install_http(app, state)
    install_ws(app)
    install_v2(app)
    install_page(app)
    if settings.cors_origins:  # off unless configured: browsers then refuse cross-origin calls
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replay", "X-Request-ID"],
        )
    return app


def _reload_keys_on_sighup(auth: Auth) -> None:
    """SIGHUP re-reads the API key file (it is also re-read when it changes). Only where this
    process's main thread runs the loop (``carryover serve``; not an app served from a thread)."""
    if auth.keys is None:
        return
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, auth.reload)
