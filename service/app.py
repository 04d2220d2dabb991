"""Composition: builds the FastAPI app from the parts. No business logic here.

``app.state.carryover`` holds the typed ``AppState`` (``service.api.state``) for the app's
lifetime: settings, metrics, the ``SessionService`` once started, readiness, and the open
WebSocket streams. Its idempotent ``drain()`` is the one drain: the lifespan's shutdown calls it,
and so does ``service.serve.DrainingServer`` before uvicorn closes WebSockets itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

from fastapi import FastAPI

from service.api.http import install_http
from service.api.page import install_page
from service.api.state import AppState, install_state
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
            state_pairs=settings.state or None,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
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
    )
    install_state(app, state)
    install_http(app, state)
    install_ws(app)
    install_page(app)
    return app
