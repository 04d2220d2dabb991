"""All settings in one typed object (env ``CARRYOVER_*``, CLI flags override). Passed down, never
read from the environment deep inside.

The ``carryover serve`` flags are derived from this class by pydantic-settings' own CLI support
(see ``service/serve.py``): kebab-case field names, plus the shortcuts below for the flags that
read better than their field names. A field's ``metavar`` (in ``json_schema_extra``) names its
value in ``--help``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, CliVariadicArg, SettingsConfigDict

from service.engine.metadata import FlagDeclaration, Form
from service.errors import ModelContractError

BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "charlm.onnx"
ENV_PREFIX = "CARRYOVER_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        cli_kebab_case=True,
        cli_show_env_vars=True,
        cli_shortcuts={"models": "model", "session-ttl-s": "session-ttl", "redis-timeout-s": "redis-timeout"},
    )

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="TCP port")
    workers: int = Field(1, ge=1, description="server processes (each runs its own batcher; state is shared in Redis)")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text, or JSON for log shippers")
    access_log: bool = Field(
        False,
        description="one log line per HTTP request (logger service.access); off by default: at 256 HTTP "
        "sessions it cost a quarter of the throughput, and the request metrics count every request anyway",
    )
    models: list[str] = Field(
        [f"charlm={BUNDLED_MODEL}"],
        description="NAME=PATH of a served model (repeatable; the first is the default)",
        json_schema_extra={"metavar": "NAME=PATH"},
    )
    state: list[str] = Field(
        [],
        description="state pair for models without carryover metadata (repeatable; MODEL= prefix: that model only)",
        json_schema_extra={"metavar": "[MODEL=]IN:OUT[:AXIS]"},
    )
    mask: list[str] = Field(
        [],
        description="mask input of a model without metadata (unset: the input named mask; MODEL= prefix)",
        json_schema_extra={"metavar": "[MODEL=]NAME"},
    )
    form: list[str] = Field(
        [],
        description="sequence or step, for a model without metadata (unset: sequence with a mask; MODEL= prefix)",
        json_schema_extra={"metavar": "[MODEL=]FORM"},
    )
    constant: list[str] = Field(
        [],
        description="per-session constant input of a model without metadata (repeatable; MODEL= prefix)",
        json_schema_extra={"metavar": "[MODEL=]INPUT:BATCH_AXIS:LENGTH_AXIS:MASK"},
    )
    providers: CliVariadicArg[list[str] | None] = Field(
        None,
        description="ONNX Runtime execution providers, e.g. cuda cpu (unset: CUDA if usable, else CPU)",
        json_schema_extra={"metavar": "PROVIDER"},
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = ORT's choice)")

    redis_url: str | None = Field(
        None,
        description="redis://, rediss:// or unix:// URL (any Redis Cluster node works); unset = embedded Redis",
        json_schema_extra={"metavar": "URL"},
    )
    data_dir: Path = Field(
        Path("data"), description="where the embedded Redis keeps its AOF", json_schema_extra={"metavar": "DIR"}
    )
    redis_timeout_s: float = Field(2.0, gt=0, description="socket timeout of Redis calls, in seconds")
    redis_max_connections: int = Field(64, ge=1, description="Redis connections per process; more callers wait")
    session_ttl_s: int = Field(86_400, ge=1, description="default session TTL in seconds, refreshed on every access")
    max_sessions: int = Field(1_000_000, ge=1, description="creating more sessions answers 429")
    replay_window_s: float = Field(
        60.0, gt=0, description="how long a step's outputs are kept for a retry with the same `step` (seconds)"
    )
    max_constant_bytes: int = Field(
        1024 * 1024, ge=0, description="bytes of one session's constants, all together (413 above)"
    )
    replay_max_bytes: int = Field(
        256 * 1024, ge=0, description="larger outputs keep no replay copy (a retry then gets 409 with the step)"
    )

    api_keys_file: Path | None = Field(
        None,
        description="API keys, one NAME:SHA256HEX per line (re-read on change and on SIGHUP); unset = no keys",
        json_schema_extra={"metavar": "PATH"},
    )
    cors_origins: list[str] = Field(
        [], description="origins allowed by CORS (repeatable; none = CORS off)", json_schema_extra={"metavar": "ORIGIN"}
    )
    rate_limit_rps: float = Field(0.0, ge=0, description="requests per second per API key, across replicas (0 = off)")
    rate_limit_burst: int = Field(0, ge=0, description="token bucket size of the rate limit (0 = one second's worth)")
    max_sessions_per_key: int = Field(0, ge=0, description="live sessions per API key (0 = off)")
    max_streams_per_key: int = Field(
        0, ge=0, description="open WebSocket connections per API key and process (0 = off)"
    )
    ws_auth_timeout_s: float = Field(
        10.0, gt=0, description="how long a WebSocket without an Authorization header has to send its auth message"
    )

    max_batch_size: int = Field(64, ge=1, description="rows (sessions) per batch")
    max_batch_tokens: int = Field(8192, ge=1, description="sum of T (timesteps) over a batch")
    max_wait_us: int = Field(2000, ge=0, description="how long to wait for more work, only while the device is busy")
    idle_spin: bool = Field(
        True,
        description="the idle path's tiny model calls (inline_max_cells, nothing else queued) run on a two-thread "
        "ORT session whose threads spin between calls: an idle server answers sooner, for CPU spent spinning "
        "while lightly loaded; false = one thread, no spinning (the main session never spins)",
    )
    inline_max_cells: int = Field(
        16,
        ge=0,
        description="a model call of at most this many rows × timesteps, with nothing else queued, runs on the "
        "event loop instead of the device thread (0 = never)",
    )
    record_cache_sessions: int = Field(
        10_000,
        ge=0,
        description="records of sessions this process last wrote kept in memory, per model, so their next step "
        "skips the load (the write's CAS checks them; 0 = off)",
    )
    max_queue: int = Field(4096, ge=1, description="queued requests per model before 503 overloaded")
    max_chunk: int = Field(256, ge=1, description="long requests run in chunks of this many steps")
    max_steps_per_request: int = Field(16_384, ge=1, description="T limit of one request (422 above)")
    max_generate_tokens: int = Field(4096, ge=1, description="max_tokens limit of one generation (422 above)")
    bucket_overhead_tokens: int = Field(
        256, ge=0, description="padding worth one extra model call when bucketing by length"
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="HTTP request body limit (413)")
    ws_max_message_bytes: int | None = Field(
        None, ge=1024, description="WebSocket message limit (error, then close 1009); unset = max_body_bytes"
    )
    ws_compression: bool = Field(
        False, description="permessage-deflate on WebSocket frames (less bandwidth, much more CPU per frame)"
    )
    ws_max_in_flight: int = Field(8, ge=1, description="pipelined chunks per WebSocket connection")
    ws_idle_timeout_s: float = Field(
        300.0, gt=0, description="a WebSocket that sends nothing this long, with no chunk in flight, is closed 4408"
    )

    @property
    def ws_message_limit(self) -> int:
        """Bytes of one WebSocket message (``ws_max_message_bytes``, else ``max_body_bytes``)."""
        return self.ws_max_message_bytes or self.max_body_bytes

    def model_paths(self) -> dict[str, Path]:
        """``{name: path}`` of the served models, in order (a bare PATH is named by its stem)."""
        out: dict[str, Path] = {}
        for spec in self.models:
            name, sep, path = spec.partition("=")
            if not sep:
                path, name = name, Path(name).stem
            out[name] = Path(path)
        return out

    def model_flags(self, name: str) -> FlagDeclaration:
        """The ``--state``/``--mask``/``--form``/``--constant`` flags that apply to model ``name``:
        the ones prefixed ``name=`` if it has any for that flag, else the unprefixed ones."""
        return model_flags(name, list(self.model_paths()), self.state, self.mask, self.form, self.constant)


def _scoped(specs: list[str], name: str, models: list[str], flag: str) -> list[str]:
    """The values of ``specs`` that apply to ``name``; a prefix naming no served model is an error."""
    own, shared = [], []
    for spec in specs:
        prefix, sep, value = spec.partition("=")
        if not sep:
            shared.append(spec)
            continue
        if prefix not in models:
            raise ModelContractError(f"{flag} {spec!r} names model {prefix!r}, which is not served (models: {models})")
        if prefix == name:
            own.append(value)
    return own or shared


def model_flags(
    name: str, models: list[str], state: list[str], mask: list[str], form: list[str], constant: Sequence[str] = ()
) -> FlagDeclaration:
    """See :meth:`Settings.model_flags`; also what ``carryover verify`` uses for its one model."""
    masks, forms = _scoped(mask, name, models, "--mask"), _scoped(form, name, models, "--form")
    if len(masks) > 1 or len(forms) > 1:
        raise ModelContractError(f"model {name!r} is given more than one --mask or --form")
    if forms and forms[0] not in ("sequence", "step"):
        raise ModelContractError(f"--form {forms[0]!r} for model {name!r} must be sequence or step")
    chosen: Form | None = "step" if forms == ["step"] else "sequence" if forms else None
    constants = tuple(_scoped(list(constant), name, models, "--constant"))
    return FlagDeclaration(
        tuple(_scoped(state, name, models, "--state")), masks[0] if masks else None, chosen, constants
    )


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return f"{ENV_PREFIX}{field.upper()}"


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """One message per ``CARRYOVER_*`` variable that names no setting (pydantic-settings ignores
    them silently), with the closest real name when there is one."""
    known = [env_name(name) for name in Settings.model_fields]
    problems = []
    for key in sorted(environ):
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known:
            close = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"unknown setting {key}{hint}")
    return problems
