"""``carryover serve``: flags built from ``Settings`` (so ``--help`` documents every setting and
its ``CARRYOVER_*`` variable), then uvicorn.

With no Redis URL the serve process itself starts the embedded Redis and hands its socket URL
to the workers, so several workers (``--workers N``) share one store, as replicas would.
SIGTERM: uvicorn stops accepting, finishes in-flight requests, then the app's shutdown closes
WebSockets with 1012 and drains the batchers (their writes included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic.fields import FieldInfo

from service.config import Settings

log = logging.getLogger(__name__)
# Flag names that read better than the field names.
FLAG_NAMES = {"models": "--model", "session_ttl_s": "--session-ttl", "redis_timeout_s": "--redis-timeout"}
GRACEFUL_SHUTDOWN_S = 30


def _flag(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings.model_construct()  # field defaults only, no environment
    for name, field in Settings.model_fields.items():
        default = getattr(defaults, name)
        default = str(default) if isinstance(default, os.PathLike) else default
        env = f"CARRYOVER_{name.upper()}"
        help_text = f"{field.description} (default: {default!r}; env {env})"
        if _is_list(field):
            action = "append" if name in ("models", "state") else None
            if action:
                parser.add_argument(
                    _flag(name),
                    dest=name,
                    action="append",
                    help=help_text,
                    metavar="NAME=PATH" if name == "models" else "IN:OUT[:AXIS]",
                )
            else:
                parser.add_argument(_flag(name), dest=name, nargs="+", help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, help=help_text, metavar=name.upper())


def _is_list(field: FieldInfo) -> bool:
    return "list" in str(field.annotation)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    base = Settings()  # environment and defaults
    merged = base.model_dump() | given
    return Settings.model_validate(merged)


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The settings as ``CARRYOVER_*`` variables, for worker processes that rebuild them."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[f"CARRYOVER_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


class DrainingServer(uvicorn.Server):
    """uvicorn closes WebSockets itself at shutdown, cutting pipelined chunks; this server first
    lets the app drain them (answer what was read, then close 1012), then shuts down as usual."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = _find_app(self.config.loaded_app)
        if app is not None:
            from service.api.state import app_state

            await app_state(app).drain()  # the app's one drain; its lifespan's call is then a no-op
        await super().shutdown(sockets)


def _find_app(app: Any) -> FastAPI | None:
    """The FastAPI app inside uvicorn's wrappers (proxy headers, message logger...)."""
    for _ in range(8):
        if isinstance(app, FastAPI):
            return app
        app = getattr(app, "app", None)
    return None


def uvicorn_config(app: Any, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ws="websockets-sansio",
        ws_max_size=settings.max_body_bytes + 1024,
        **kwargs,
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    # uvicorn re-raises the signal it caught once it has shut down; without a handler of ours
    # that would kill the process before the embedded Redis is stopped.
    raise SystemExit(0)


def run(settings: Settings) -> None:
    signal.signal(signal.SIGTERM, _exit_cleanly)
    embedded = None
    if settings.redis_url is None:
        from service.store.embedded import EmbeddedRedis

        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
        settings = settings.model_copy(update={"redis_url": embedded.url})
        log.info("embedded Redis (AOF under %s) at %s", settings.data_dir, embedded.url)
    try:
        os.environ.update(settings_to_env(settings))
        config = uvicorn_config(
            "service.app:create_app", settings, factory=True, workers=settings.workers, log_level="info"
        )
        if settings.workers > 1:
            # uvicorn's worker processes build a plain uvicorn.Server: at shutdown it closes
            # WebSockets (1012) before the app can answer pipelined chunks. Those chunks still
            # land (the batcher drains); a client sending `step` learns their outcome on retry.
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            DrainingServer(config).run()
    finally:
        if embedded is not None:
            embedded.stop()


def _serve(args: argparse.Namespace) -> int:
    run(settings_from_args(args))
    return 0


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the inference service",
        description="Serve recurrent models over HTTP and WebSocket. Every flag can also be "
        "set with its CARRYOVER_* environment variable.",
    )
    add_settings_arguments(serve)
    serve.set_defaults(func=_serve)
