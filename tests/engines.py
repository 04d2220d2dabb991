"""Running a real session engine (real Redis, real ONNX Runtime) inside a test."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from model_export.verify import unpadded_run
from service.config import Settings
from service.engine.model import RecurrentModel
from service.sessions import SessionService
from service.store.store import SessionStore


@contextlib.asynccontextmanager
async def running_engine(
    url: str, models: Mapping[str, RecurrentModel], **settings: Any
) -> AsyncIterator[SessionService]:
    data_dir = Path(tempfile.mkdtemp(prefix="carryover-engine-"))
    store = await SessionStore.connect(url)
    service = SessionService(Settings(data_dir=data_dir, **settings), store, models)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        await store.close()


async def exported_state(service: SessionService, session_id: str, owner: str = "") -> dict[str, np.ndarray]:
    archive = np.load(__import__("io").BytesIO(await service.export_state(session_id, owner)), allow_pickle=False)
    return {k: archive[k] for k in archive.files}


def offline(
    model: RecurrentModel, inputs: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The reference: the whole unpadded sequence alone, B = 1."""
    return unpadded_run(model, inputs)


def assert_matches_offline(
    model: RecurrentModel,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    state: dict[str, np.ndarray],
    atol: float = 1e-5,
) -> None:
    ref_out, ref_state = offline(model, inputs)
    for k, v in ref_out.items():
        np.testing.assert_allclose(outputs[k], v, atol=atol, rtol=0)
    for k, v in ref_state.items():
        np.testing.assert_allclose(state[k], v, atol=atol, rtol=0)
