"""All settings in one typed object (env ``CARRYOVER_*``, CLI flags override). Passed down, never
read from the environment deep inside."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "charlm.onnx"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CARRYOVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="TCP port")
    workers: int = Field(1, ge=1, description="server processes (each runs its own batcher; state is shared in Redis)")
    models: list[str] = Field(
        default_factory=lambda: [f"charlm={BUNDLED_MODEL}"],
        description="NAME=PATH of each served model; the first is the default",
    )
    state: list[str] = Field(
        default_factory=list, description="IN:OUT[:BATCH_AXIS] state pairs for models without metadata"
    )
    providers: list[str] | None = Field(
        None, description="execution providers, e.g. cuda cpu (default: CUDA if usable, else CPU)"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = ORT's choice)")

    redis_url: str | None = Field(None, description="redis://, rediss:// or unix:// URL; unset = embedded Redis")
    data_dir: Path = Field(Path("data"), description="where the embedded Redis keeps its AOF")
    redis_timeout_s: float = Field(2.0, gt=0, description="socket timeout of Redis calls")
    redis_max_connections: int = Field(64, ge=1, description="Redis connections per process; more callers wait")
    session_ttl_s: int = Field(86_400, ge=1, description="default session TTL, refreshed on every access")
    max_sessions: int = Field(1_000_000, ge=1, description="creating more sessions answers 429")

    max_batch_size: int = Field(64, ge=1, description="rows (sessions) per batch")
    max_batch_tokens: int = Field(8192, ge=1, description="sum of T over a batch")
    max_wait_us: int = Field(2000, ge=0, description="how long to wait for more work, only while the device is busy")
    max_queue: int = Field(4096, ge=1, description="queued requests per model before 503 overloaded")
    max_chunk: int = Field(256, ge=1, description="long requests run in chunks of this many steps")
    max_steps_per_request: int = Field(16_384, ge=1, description="T limit of one request")
    bucket_overhead_tokens: int = Field(
        256, ge=0, description="padding worth one extra model call when bucketing by length"
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body / WebSocket message limit")
    ws_max_in_flight: int = Field(8, ge=1, description="chunks in flight per WebSocket connection")

    def model_paths(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for spec in self.models:
            name, sep, path = spec.partition("=")
            if not sep:
                path, name = name, Path(name).stem
            out[name] = Path(path)
        return out
