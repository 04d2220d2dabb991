"""The naive baseline: FastAPI + Redis, one ONNX Runtime call per request at B=1.

    python -m bench.baselines.naive --port 8001 --redis-url redis://127.0.0.1:6379/0

What a first version of the service would be: per request, GET the session's state bytes from
Redis, run the model on that one sequence (B=1, no padding), SET the new state back. No
batching, no compare-and-set, no replay (a ``step`` in the body is accepted and ignored), no
validation beyond what the model needs. The ONNX Runtime call runs on the event loop, as
straightforward ``async def`` endpoint code would. It serves the bundled char LM (or any model
with the same tensor names) and speaks the carryover wire format the load generator uses:

* ``POST /v1/sessions`` → 201 ``{"session_id", "model", "step"}``
* ``POST /v1/sessions/{id}/step`` with ``{"inputs": {"tokens": [...]}}`` →
  ``{"session_id", "step", "outputs": {"logits": [[...], ...]}}``
* ``WS /v1/stream``: ``{"type": "session", ...}`` first, then one reply per chunk: text
  ``{"type": "result", "step", "outputs", "replay": false}``, or for a binary int32 chunk a
  binary ``<qII`` header (step, T, O) and float32 logits.
"""

from __future__ import annotations

import argparse
import secrets
import struct
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import orjson
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from starlette.responses import Response

from service.config import BUNDLED_MODEL

TOKENS, MASK, STATE_IN, STATE_OUT, OUTPUT = "tokens", "mask", "h0", "hn", "logits"
STEP = struct.Struct("<q")  # the stored value: step count, then the raw float32 state
REPLY_HEADER = struct.Struct("<qII")
TTL_S = 86_400
JSON = "application/json"


class NaiveModel:
    """The model at B=1: tokens ``[T]`` and a state → logits ``[T, V]`` and the new state."""

    def __init__(self, path: str, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        shape = next(i.shape for i in self.session.get_inputs() if i.name == STATE_IN)
        self.state_shape = tuple(1 if isinstance(d, str) else d for d in shape)  # the batch axis → 1
        self.initial = np.zeros(self.state_shape, np.float32).tobytes()

    def run(self, tokens: np.ndarray, state: bytes) -> tuple[np.ndarray, bytes]:
        h = np.frombuffer(state, np.float32).reshape(self.state_shape)
        feeds = {TOKENS: tokens.reshape(1, -1), MASK: np.ones((1, tokens.size), np.bool_), STATE_IN: h}
        logits, hn = self.session.run([OUTPUT, STATE_OUT], feeds)
        return logits[0], np.ascontiguousarray(hn, np.float32).tobytes()


def create_app(redis_url: str, model_path: str = str(BUNDLED_MODEL), threads: int = 0) -> FastAPI:
    """The naive app; one Redis client and one ORT session, made at import of the app."""
    app = FastAPI(title="naive baseline")
    model = NaiveModel(model_path, threads)
    store = aioredis.Redis.from_url(redis_url)

    async def create() -> str:
        session_id = secrets.token_urlsafe(16)
        await store.set(f"naive:{session_id}", STEP.pack(0) + model.initial, ex=TTL_S)
        return session_id

    async def step(session_id: str, tokens: Any) -> tuple[int, np.ndarray] | None:
        key = f"naive:{session_id}"
        value = cast(bytes | None, await store.get(key))
        if value is None:
            return None
        logits, state = model.run(np.asarray(tokens, np.int64), value[STEP.size :])
        count = STEP.unpack_from(value)[0] + len(logits)
        await store.set(key, STEP.pack(count) + state, ex=TTL_S)
        return count, logits

    @app.get("/readyz")
    async def readyz() -> Response:
        await store.ping()
        return Response(b'{"status":"ready"}', media_type=JSON)

    @app.post("/v1/sessions", status_code=201)
    async def create_session() -> Response:
        session_id = await create()
        body = {"session_id": session_id, "model": "charlm", "step": 0}
        return Response(orjson.dumps(body), status_code=201, media_type=JSON)

    @app.post("/v1/sessions/{session_id}/step")
    async def step_session(session_id: str, request: Request) -> Response:
        try:
            tokens = orjson.loads(await request.body())["inputs"][TOKENS]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return Response(b'{"detail":"expected {\\"inputs\\": {\\"tokens\\": [...]}}"}', 422, media_type=JSON)
        done = await step(session_id, tokens)
        if done is None:
            return Response(b'{"detail":"session not found"}', 404, media_type=JSON)
        body = {"session_id": session_id, "step": done[0], "outputs": {OUTPUT: done[1]}}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type=JSON)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        session_id = await create()
        hello = {"type": "session", "session_id": session_id, "model": "charlm", "step": 0}
        await websocket.send_text(orjson.dumps(hello).decode())
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    done = await step(session_id, np.frombuffer(message["bytes"], "<i4"))
                    assert done is not None  # created above, refreshed by every step
                    logits = np.ascontiguousarray(done[1], "<f4")
                    await websocket.send_bytes(REPLY_HEADER.pack(done[0], *logits.shape) + logits.tobytes())
                    continue
                done = await step(session_id, orjson.loads(message["text"])["inputs"][TOKENS])
                assert done is not None
                reply = {"type": "result", "step": done[0], "outputs": {OUTPUT: done[1]}, "replay": False}
                await websocket.send_text(orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY).decode())
        except WebSocketDisconnect:
            return

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = ORT's choice)")
    args = p.parse_args(argv)
    app = create_app(args.redis_url, args.model, args.intra_op_threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
