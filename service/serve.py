"""``carryover serve``: flags derived from ``Settings`` by pydantic-settings (so ``--help``
documents every setting, its default and its ``CARRYOVER_*`` variable), then uvicorn.

With no Redis URL the serve process itself starts the embedded Redis and hands its socket URL
to the workers, so several workers (``--workers N``) share one store, as replicas would.
SIGTERM or SIGINT (Ctrl-C), with one worker or several: the :class:`DrainingServer` answers the
chunks its WebSockets have read and closes them with 1012, uvicorn stops accepting and finishes
in-flight requests, then the app's shutdown drains the batchers (their writes included); the
process exits 0 without a traceback. Start-up errors are checked here, before anything slow, and
surface as one line (see ``service/cli.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from pydantic_settings import CliSettingsSource
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess, multiprocess
from uvicorn.supervisors.multiprocess import Process

from service.config import Settings, env_name, unknown_env_vars
from service.errors import ModelContractError, StartupError, Unavailable, UnknownSetting
from service.logging_setup import LogFormat, configure_logging

if TYPE_CHECKING:
    from service.engine.model import RecurrentModel

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 30
CLOSE_REPLY_TIMEOUT_S = 5.0  # how long a client may take to answer the 1012 close frame


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
            await self._wait_for_close_replies()
        await super().shutdown(sockets)

    async def _wait_for_close_replies(self, timeout_s: float = CLOSE_REPLY_TIMEOUT_S) -> None:
        """Wait until the clients have answered the close frames (uvicorn then closes each TCP
        connection itself). uvicorn's shutdown closes the TCP at once; a client still sending
        chunks then gets a reset, which discards the replies and close frame it had not read."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            getattr(c, "close_sent", False) and not c.transport.is_closing() for c in self.server_state.connections
        ):
            await asyncio.sleep(0.01)


def _find_app(app: Any) -> FastAPI | None:
    """The FastAPI app inside uvicorn's wrappers (proxy headers, message logger...)."""
    for _ in range(8):
        if isinstance(app, FastAPI):
            return app
        app = getattr(app, "app", None)
    return None


class ServeConfig(uvicorn.Config):
    """uvicorn's config, with carryover's logging when ``log_format`` is given. uvicorn calls
    ``configure_logging`` in every process it runs (here and in each worker, after the spawn), so
    this is where every process gets the same handlers. uvicorn's access log is always off: the
    app writes one access line per request itself."""

    def __init__(self, app: Any, *, log_format: LogFormat | None = None, **kwargs: Any) -> None:
        self.log_format = log_format
        if log_format is not None:
            kwargs["log_config"] = None  # no dictConfig of uvicorn's own: ours below
        super().__init__(app, access_log=False, **kwargs)

    def configure_logging(self) -> None:
        if self.log_format is not None:
            configure_logging(self.log_format)
        super().configure_logging()  # uvicorn's log levels; its access logger silenced


def uvicorn_config(app: Any, settings: Settings, **kwargs: Any) -> ServeConfig:
    """The uvicorn config of ``settings`` (address, drain time, WebSocket limits)."""
    return ServeConfig(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ws="websockets-sansio",
        ws_max_size=settings.ws_message_limit + 1024,  # the app answers 1009 itself below this
        # Deflating every frame of logits took 14 % of the server's CPU at 256 WebSocket sessions
        # (docs/bench/flame-before.svg); off unless asked for.
        ws_per_message_deflate=settings.ws_compression,
        **kwargs,
    )


class DrainingWorker(Process):
    """A ``--workers`` process that runs the :class:`DrainingServer` (uvicorn's runs a plain
    ``uvicorn.Server``, which closes WebSockets before their pipelined chunks are answered) and
    ends quietly on SIGTERM / SIGINT once it has drained."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        _stop_cleanly_on_signals()
        super().target(sockets)

    def always_pong(self) -> None:
        # The supervisor closes its end of the health-check pipe when it stops the worker.
        with contextlib.suppress(OSError, EOFError):
            super().always_pong()


class DrainingSupervisor(Multiprocess):
    """uvicorn's worker supervisor (health checks, restarts of dead workers, SIGHUP / SIGTTIN /
    SIGTTOU), with :class:`DrainingWorker` workers. uvicorn builds its workers through the module
    global ``Process`` of ``uvicorn.supervisors.multiprocess``; it points at ``DrainingWorker``
    while this supervisor runs (tests/service/test_replicas.py checks that the workers drain)."""

    def run(self) -> None:
        original = multiprocess.Process
        multiprocess.Process = DrainingWorker  # type: ignore[misc]
        try:
            super().run()
        finally:
            multiprocess.Process = original  # type: ignore[misc]

    def failed_to_start(self) -> bool:
        """Whether a worker exited because its start-up failed (the app's lifespan, e.g. a model
        or Redis); uvicorn then stops all workers and returns normally."""
        return any(p.exitcode == STARTUP_FAILURE for p in self.processes)


def _exit_cleanly(signum: int, frame: object) -> None:
    # uvicorn re-raises the signal it caught once it has shut down; without a handler of ours
    # that would kill the process (SIGTERM) or raise KeyboardInterrupt with a traceback
    # (SIGINT, Ctrl-C), before the embedded Redis is stopped.
    raise SystemExit(0)


def _stop_cleanly_on_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)


def bind(settings: Settings) -> socket.socket:
    """The listening socket, bound here (before anything slow) so that a port in use is a
    :class:`StartupError`; uvicorn (or each worker) listens on it."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def check_models(settings: Settings) -> None:
    """Every model file exists (workers load them later, each for itself)."""
    for name, path in settings.model_paths().items():
        if not path.is_file():
            raise StartupError(f"model {name}: no such file {path}")


def check_keys(settings: Settings) -> None:
    """The API key file, if set, can be read and holds keys (the app reads it again itself)."""
    from service.keys import KeyFileError, KeyRing

    if settings.api_keys_file is not None:
        try:
            KeyRing(settings.api_keys_file)
        except KeyFileError as e:
            raise StartupError(str(e)) from None


def load_served_models(settings: Settings) -> dict[str, RecurrentModel]:
    """Load the models here, so that one that cannot be loaded is one clear error."""
    from service.app import load_models

    try:
        return load_models(settings)
    except ModelContractError:
        raise
    except Exception as e:  # ONNX Runtime's own errors (not ONNX, unsupported operator, ...)
        raise StartupError(f"cannot load the models: {e}") from None


def check_store(url: str, settings: Settings) -> None:
    """Connect to the Redis ``url`` once (ping, cluster detection, scripts) and close again."""
    from service.store.store import SessionStore

    async def connect() -> None:
        store = await SessionStore.connect(url, socket_timeout_s=settings.redis_timeout_s)
        await store.close()

    try:
        asyncio.run(connect())
    except (Unavailable, ValueError, OSError) as e:
        raise StartupError(f"cannot use Redis at {url}: {e}") from None


def run(settings: Settings) -> None:
    """Serve until SIGTERM / SIGINT, then drain. Start-up problems (port in use, data dir locked,
    Redis unreachable, a model that cannot be loaded) raise :class:`StartupError`,
    :class:`EmbeddedRedisError` or :class:`ModelContractError` before anything is served."""
    configure_logging(settings.log_format)
    _stop_cleanly_on_signals()
    check_models(settings)
    check_keys(settings)
    sock = bind(settings)
    embedded = None
    try:
        if settings.redis_url is None:
            from service.store.embedded import EmbeddedRedis

            embedded = EmbeddedRedis(settings.data_dir)
            embedded.start()
            settings = settings.model_copy(update={"redis_url": embedded.url})
            log.info("embedded Redis (AOF under %s) at %s", settings.data_dir, embedded.url)
        else:
            check_store(settings.redis_url, settings)
        os.environ.update(settings_to_env(settings))  # the workers' settings
        log.info("listening on http://%s:%d with %d worker(s)", settings.host, settings.port, settings.workers)
        options: dict[str, Any] = {"log_format": settings.log_format, "log_level": "info"}
        if settings.workers > 1:
            factory = "service.app:create_app"  # each worker builds its own app (and loads the models)
            config = uvicorn_config(factory, settings, factory=True, workers=settings.workers, **options)
            supervisor = DrainingSupervisor(config, sockets=[sock])
            supervisor.run()
            if supervisor.failed_to_start():
                raise StartupError("a worker failed to start (its error is logged above)")
        else:
            from service.app import create_app

            app = create_app(settings, models=load_served_models(settings))
            server = DrainingServer(uvicorn_config(app, settings, **options))
            try:
                server.run(sockets=[sock])
            except SystemExit as e:  # uvicorn exits this way when the app's start-up fails
                if e.code == STARTUP_FAILURE:
                    raise StartupError("the server failed to start (its error is logged above)") from None
                raise
    finally:
        sock.close()
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
