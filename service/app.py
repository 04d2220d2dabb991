"""Composition: builds the FastAPI app from the parts. No business logic here.

``app.state`` holds, for the app's lifetime: ``settings``, ``metrics``, ``store``, ``sessions``
(the ``SessionService``), ``ready`` (models loaded and store connected), ``shutting_down``, and
``websockets`` (open WebSocket connections, closed with 1012 on shutdown).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI

from service.config import Settings
from service.engine.model import RecurrentModel
from service.metrics import Metrics
from service.sessions import SessionService
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


def create_app(settings: Settings | None = None, *, models: Mapping[str, RecurrentModel] | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = dict(models) if models is not None else load_models(settings)
        store = await SessionStore.connect(
            settings.redis_url,
            data_dir=settings.data_dir,
            socket_timeout_s=settings.redis_timeout_s,
            max_connections=settings.redis_max_connections,
        )
        sessions = SessionService(settings, store, served, metrics)
        await sessions.start()
        app.state.store, app.state.sessions = store, sessions
        app.state.ready = True
        log.info(
            "carryover ready: models %s, store %s",
            sorted(served),
            "embedded Redis" if settings.redis_url is None else "external Redis",
        )
        try:
            yield
        finally:
            app.state.ready = False
            app.state.shutting_down = True
            from service.api.ws import close_all

            await close_all(app)  # 1012: the client should reconnect elsewhere / later
            await sessions.stop()  # finishes queued and in-flight batches and their writes
            await store.close()
            log.info("carryover stopped")

    from service.api.http import install_http
    from service.api.page import install_page
    from service.api.ws import install_ws

    app = FastAPI(
        title="carryover",
        version="0.1.0",
        lifespan=lifespan,
        description="Streaming inference for recurrent models: per-session state in Redis, "
        "ragged micro-batching on ONNX Runtime.",
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.ready, app.state.shutting_down, app.state.websockets = False, False, set()
    install_http(app)
    install_ws(app)
    install_page(app)
    return app
