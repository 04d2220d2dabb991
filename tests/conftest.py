from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from model_export.export import export_both
from service.config import BUNDLED_MODEL
from service.engine.model import RecurrentModel
from tests.models import SPECS, build


@dataclass(frozen=True)
class Exported:
    name: str
    sequence: Path
    step: Path


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Every test model exported once per test session, in both forms from one trace."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name in SPECS:
        seq, step = export_both(build(name), root / f"{name}.onnx", root / f"{name}_step.onnx")
        out[name] = Exported(name, seq, step)
    return out


@pytest.fixture(scope="session")
def loaded(exported: dict[str, Exported]) -> dict[str, RecurrentModel]:
    """Runtime models keyed ``name`` (sequence form) and ``name_step`` (step form)."""
    models = {}
    for name, e in exported.items():
        models[name] = RecurrentModel(e.sequence, name=name)
        models[f"{name}_step"] = RecurrentModel(e.step, name=f"{name}_step")
    models["charlm"] = RecurrentModel(BUNDLED_MODEL, name="charlm")  # the bundled demo LM (sequence form)
    return models


from tests.live_server import api_server  # noqa: E402, F401
from tests.redis_fixture import redis_server, redis_url  # noqa: E402, F401
