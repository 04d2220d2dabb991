"""``carryover serve``: flags derived from ``Settings`` by pydantic-settings (so ``--help``
documents every setting, its default and its ``CARRYOVER_*`` variable), then uvicorn.

With no Redis URL the serve process itself starts the embedded Redis and hands its socket URL
to the workers, so several workers (``--workers N``) share one store, as replicas would.
SIGTERM: uvicorn stops accepting, finishes in-flight requests, then the app's shutdown closes
WebSockets with 1012 and drains the batchers (their writes included).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic_settings import CliSettingsSource

from service.config import Settings, env_name, unknown_env_vars
from service.errors import UnknownSetting

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 30


def settings_cli_source(parser: argparse.ArgumentParser) -> CliSettingsSource[argparse.ArgumentParser]:
    """Add one flag per setting to ``parser`` (pydantic-settings' CLI support: names, types,
    help with default and env var) and return the source that turns its parse into settings."""
    return CliSettingsSource(Settings, root_parser=parser, add_argument_method=_add_argument)


def _add_argument(parser: Any, *names: str, **kwargs: Any) -> Any:
    # The one thing pydantic-settings cannot derive: a readable name for a value in --help.
    field = Settings.model_fields.get(str(kwargs.get("dest")))
    extra = field.json_schema_extra if field is not None else None
    if isinstance(extra, dict) and "metavar" in extra:
        kwargs["metavar"] = extra["metavar"]
    return parser.add_argument(*names, **kwargs)


def settings_from_args(
    source: CliSettingsSource[argparse.ArgumentParser],
    args: argparse.Namespace,
) -> Settings:
    """The settings of a parse: flags over ``CARRYOVER_*`` variables over defaults. An unknown
    ``CARRYOVER_*`` variable is an error (:class:`UnknownSetting`), like an unknown flag."""
    problems = unknown_env_vars(os.environ)
    if problems:
        raise UnknownSetting("; ".join(problems))
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(_cli_settings_source=source(parsed_args=given))


def settings_table() -> str:
    """README.md's configuration table (Markdown), generated from ``Settings`` and its flags;
    a test checks that the README holds exactly this table."""
    parser = argparse.ArgumentParser()
    settings_cli_source(parser)
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest in Settings.model_fields}
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag = ", ".join(f"`{f}`" for f in flags[name])
        default = _show_default(field.get_default(call_default_factory=True))
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| {flag} | `{env_name(name)}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _show_default(value: Any) -> str:
    if value is None:
        return "unset"
    items = value if isinstance(value, list) else [value]
    if not items:
        return "none"
    # paths inside the package, as they are in a checkout
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    return ", ".join(f"`{str(item).replace(root, '')}`" for item in items)


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The settings as ``CARRYOVER_*`` variables, for worker processes that rebuild them."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[env_name(name)] = json.dumps(value) if isinstance(value, list) else str(value)
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


def _serve(source: CliSettingsSource[argparse.ArgumentParser], args: argparse.Namespace) -> int:
    run(settings_from_args(source, args))
    return 0


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the inference service",
        description="Serve recurrent models over HTTP and WebSocket. Every flag can also be "
        "set with its CARRYOVER_* environment variable.",
    )
    serve.set_defaults(func=functools.partial(_serve, settings_cli_source(serve)))
