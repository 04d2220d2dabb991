"""Fixtures of every test. The model fixtures load the committed ONNX files of ``tests/data/models/``
(see ``tests/make_models.py``), so the server tests need no PyTorch; ``tests/model_export/conftest.py``
overrides them with fresh exports for the exporter's own tests."""

from __future__ import annotations

import pytest

from service.config import BUNDLED_MODEL
from service.engine.model import RecurrentModel
from tests.make_models import Exported, committed_models

__all__ = ["Exported", "load_models"]


def load_models(exported: dict[str, Exported]) -> dict[str, RecurrentModel]:
    """Runtime models keyed ``name`` (sequence form) and ``name_step`` (step form), plus ``charlm``."""
    models = {}
    for name, e in exported.items():
        models[name] = RecurrentModel(e.sequence, name=name)
        models[f"{name}_step"] = RecurrentModel(e.step, name=f"{name}_step")
    models["charlm"] = RecurrentModel(BUNDLED_MODEL, name="charlm")  # the bundled demo LM (sequence form)
    return models


@pytest.fixture(scope="session")
def exported() -> dict[str, Exported]:
    """Every test model in both forms: the committed files (read them, never write them)."""
    return committed_models()


@pytest.fixture(scope="session")
def loaded(exported: dict[str, Exported]) -> dict[str, RecurrentModel]:
    """Runtime models of ``exported`` keyed ``name`` and ``name_step``, plus the bundled ``charlm``."""
    return load_models(exported)


from tests.live_server import api_server  # noqa: E402, F401
from tests.redis_fixture import redis_server, redis_url, store  # noqa: E402, F401
